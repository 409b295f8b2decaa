"""FedProx over CKKS-encrypted updates: Flower's FedProx behind `EncryptedRounds`.

On the server FedProx is FedAvg plus `proximal-mu` in the round config; the banks apply the
proximal correction to the decrypted global state they train from, and send their drift
encrypted as under FedAvg (server/fedavg_he.py).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from fingpt_federated.server.he_rounds import EncryptedRounds


class FedProxHEBanks(EncryptedRounds, FedProx):
    """Flower's FedProx whose aggregation adds ciphertexts with the public context only."""
