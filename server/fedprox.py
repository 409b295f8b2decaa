"""FedProx (Li et al. 2020) for the bank federation: Flower's FedProx behind `BankRounds`.

On the server FedProx is FedAvg plus one value in the round config, `proximal-mu`. The banks
do the rest: `client.training.train_local` adds mu * (w - w_global) to every gradient, which
keeps a bank's local model near the global one on skewed data and makes partial work of
stragglers safe to average.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from fingpt_federated.server.strategy import BankRounds


class FedProxBanks(BankRounds, FedProx):
    """Flower's FedProx with loud rounds, per-bank metrics and global round numbers."""
