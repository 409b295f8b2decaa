"""FedAvgM (Hsu et al. 2019) for the bank federation: Flower's FedAvgM behind `BankRounds`.

The server treats the change of the weighted mean state as a pseudo-gradient and takes an SGD
step with momentum on it: v <- momentum * v + (global - mean), then global <- global - server_lr * v.
Under DP this is post-processing of the banks' noised states (no privacy cost), though momentum
also accumulates their noise: on TFNS at epsilon 8 its accuracy collapsed in some rounds (README,
DP section). The momentum lives in the server process only: a resumed run starts it again from
zero. It needs the plaintext global state, so it does not combine with HE.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvgM

from server.strategy import BankRounds


class FedAvgMBanks(BankRounds, FedAvgM):
    """Flower's FedAvgM with loud rounds, per-bank metrics and global round numbers."""
