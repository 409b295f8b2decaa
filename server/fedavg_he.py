"""FedAvg over CKKS-encrypted updates: Flower's FedAvg behind `EncryptedRounds`.

The banks send `examples * (local - initial)` encrypted; the operator adds the ciphertexts
(server/he_rounds.py) and the banks decrypt `initial + sum / total examples`, which is FedAvg's
weighted mean of the local models (privacy/he_global.py). Flower's FedAvg contributes the
sampling, the message construction and the aggregation of metrics.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fingpt_federated.server.he_rounds import EncryptedRounds


class FedAvgHEBanks(EncryptedRounds, FedAvg):
    """Flower's FedAvg whose aggregation adds ciphertexts with the public context only."""
