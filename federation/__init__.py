"""What the operator and the banks share: the wire protocol of a round, the run's federation spec,
the files a run folder hands over, node identities and the environment of Flower's processes.

Both `server/` and `client/` import this; it imports neither."""
