"""fingpt-federated: federated fine-tuning of a hybrid financial language model across banks.

The repository root is this package (`pyproject.toml` maps `fingpt_federated` onto it): its
subpackages are the boxes of the design, `data`, `model`, `privacy`, `federation`, `client`,
`server`, `infer`, `simulations` and `conf`.
"""

__version__ = "0.1.0"
