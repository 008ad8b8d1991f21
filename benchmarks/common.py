"""What the benchmark scripts share: a real server process on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serve(model: str, ckpt: Path, *extra: str, ready_timeout_s: float = 600,
          on_start: Callable[[subprocess.Popen], None] | None = None) -> Iterator[str]:
    """``python -m server`` on a free loopback port; yields its URL, terminates it after.
    ``on_start`` receives the process (e.g. to read its memory)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", model, "--adapter", str(ckpt),
                             "--port", str(port), "--log-level", "warning", *extra], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    if on_start is not None:
        on_start(proc)
    try:
        end = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise RuntimeError("server not ready in time")
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def untrained_adapter(model: str, folder: Path, r: int = 16, std: float = 0.01) -> Path:
    """A nested adapter with random A and B ~ N(0, std) (the server's work does not depend on
    training)."""
    import torch

    from trainer.checkpoint import save_adapter
    from trainer.inject import AdapterConfig, NestedAdapter
    from trainer.models import load_model

    base, _ = load_model(model, "cpu", torch.float32)
    torch.manual_seed(0)
    adapter = NestedAdapter.inject(base, AdapterConfig(r=r))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_Bt.normal_(std=std)
    return save_adapter(folder, adapter, model)


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
