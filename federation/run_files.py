"""Names of the files an encrypted run's folder hands from the operator to a key-holding bank."""

FINAL_CIPHERTEXT = "global_state.he"
"""The last encrypted aggregate, written by the ServerApp after every round."""
INITIAL_STATE = "initial_state.safetensors"
"""The public initial state every bank rebuilds; the global is this + the decrypted mean drift."""
