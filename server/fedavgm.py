"""FedAvgM (Hsu et al. 2019) for the bank federation: Flower's FedAvgM behind `BankRounds`.

The server treats the change of the weighted mean state as a pseudo-gradient and takes an SGD
step with momentum on it: global <- global - server_lr * v, v <- momentum * v + (global - mean).
Under DP this is post-processing of the banks' noised states (no privacy cost) and it averages
their noise across rounds. The momentum lives in the server process only: a resumed run starts
it again from zero. It needs the plaintext global state, so it does not combine with HE.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvgM

from server.strategy import BankRounds


class FedAvgMBanks(BankRounds, FedAvgM):
    """Flower's FedAvgM with loud rounds, per-bank metrics and global round numbers."""
