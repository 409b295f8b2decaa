"""A bank's tables: reading and validating them (file/row/column errors), records, series, splits,
partitioners, and batches for the model. Used by the bank, the operator's test set, inference and
simulations alike; knows nothing of Flower."""
