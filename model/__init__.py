"""The hybrid FinGPT model: a frozen Hugging Face backbone with LoRA, a causal time-series
encoder, gated cross-attention fusion and a classification head. Knows nothing of Flower.

- model.build.build_model(model_cfg, num_classes, num_features) -> (HybridFinGPT, tokenizer)
- model.state: federated_state / load_federated_state / state_schema_hash (what travels),
  save_model / load_model (a whole trained model on disk)

Submodules are imported explicitly (nothing here but a log level and a warning filter), so that
importing one stays cheap.
"""

import logging
import warnings

# bitsandbytes (imported by PEFT) warns at import that an optional CPU 4-bit kernel could not be
# downloaded from the Hub; nothing is downloaded here, and its pure-PyTorch CPU path is used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# torch's own torch/utils/mkldnn.py uses `torch.jit.script_method`, which torch deprecates, and it is
# imported when bitsandbytes (imported by PEFT) first calls torch.compile: nothing here to migrate.
# Python hides third-party DeprecationWarnings, but Flower's simulation engine shows them all
# (`filterwarnings("once", DeprecationWarning)` in flwr/simulation/ray_transport/utils.py).
warnings.filterwarnings("ignore", message="`torch.jit.script_method` is deprecated", category=DeprecationWarning)
