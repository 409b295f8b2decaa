"""Names of the files a federation run writes into its run folder, in one place.

The ServerApp writes the metrics and the final state, fingpt-sim and fingpt-server the resolved
config and the FederationSpec; publishing and the benchmarks read them back.
"""

RESOLVED_CONFIG = "resolved_config.yaml"
FEDERATION_SPEC = "federation_spec.json"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
FINAL_STATE = "global_state.safetensors"
CHECKPOINTS = "checkpoints"
TIMINGS_JSON = "timings.json"  # when each round's messages moved (server/reply_poll.py)
