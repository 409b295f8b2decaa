"""The publishing hand-over: a key-holding bank turns the final encrypted global into a plaintext state.

Input: the run's `global_state.he` (the last encrypted aggregate) and `initial_state.safetensors`
(the public initial state), both written by the ServerApp; the bank's secret context. Output: a
federated-state safetensors in the format of the plaintext runs' `global_state.safetensors`
(server.checkpoint.save_state: the tensor names of model.state.federated_state, sorted, float32),
every value rounded to a bfloat16-representable one. The rounding matters: the file goes to the
operator for publishing, and exact CKKS decryptions handed to others can leak the secret key
(STACK-NOTES, Li-Micciancio); 8 significant bits leave nothing of the decryption noise.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from safetensors.numpy import load_file, save

from fingpt_federated.federation.run_files import FINAL_CIPHERTEXT, INITIAL_STATE
from fingpt_federated.privacy.atomic_file import atomic_write_bytes
from fingpt_federated.privacy.he_context import load_secret_context
from fingpt_federated.privacy.he_global import decrypt_global, round_to_bfloat16


def decrypt_final_state(global_file: Path, initial_file: Path, secret_context: Path, out: Path) -> Path:
    """Decrypt, round to bf16 values, and write the plaintext federated state to `out`."""
    he = load_secret_context(secret_context)
    initial = OrderedDict(sorted(load_file(str(initial_file)).items()))
    blob = Path(global_file).read_bytes()
    if not blob:
        raise ValueError(f"{global_file} is empty: no round of the run was aggregated")
    state = decrypt_global(initial, blob, he)
    rounded = {name: round_to_bfloat16(value) for name, value in state.items()}
    metadata = {"source": "he-decrypt", "rounding": "bfloat16", "fingerprint": he.fingerprint}
    atomic_write_bytes(out, save(rounded, metadata=metadata), mode=0o644)
    return Path(out)


def run_dir_files(run_dir: Path) -> tuple[Path, Path]:
    """(`global_state.he`, `initial_state.safetensors`) of a run folder, which must hold both."""
    files = (Path(run_dir) / FINAL_CIPHERTEXT, Path(run_dir) / INITIAL_STATE)
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing} not found: is {run_dir} the folder of an encrypted run?")
    return files
