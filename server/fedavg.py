"""FedAvg (McMahan et al. 2017) for the bank federation: Flower's FedAvg behind `BankRounds`.

The global state is the example-weighted mean of the states the sampled banks send back;
Flower's FedAvg does the averaging, `BankRounds` (server/strategy.py) the checks and bookkeeping.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fingpt_federated.server.strategy import BankRounds


class FedAvgBanks(BankRounds, FedAvg):
    """Flower's FedAvg with loud rounds, per-bank metrics and global round numbers."""
