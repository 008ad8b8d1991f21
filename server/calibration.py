"""Calibration: decode tokens/s per rank at a full batch, measured at start-up and cached per
model, adapter, device, dtype, batch and merge mode — the table the controller's ``slo``
policy and ``--min-gain`` act on and ``/ranks`` shows."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


CALIBRATION_FORMAT = 2  # 2: tables made non-increasing (format 1 caches held the raw measurement)


def non_increasing(table: dict[int, float]) -> dict[int, float]:
    """The closest table (least squares) whose throughput never rises with the rank.

    Unmerged, rank k computes the first k adapter columns, so a higher rank cannot be cheaper; a
    few calibration steps on a shared machine often say otherwise (rank 4 measured below rank 64).
    Pool-adjacent-violators: runs of ranks that break the order share their mean."""
    blocks: list[list] = []  # [mean, count, ranks]
    for k in sorted(table):
        blocks.append([table[k], 1, [k]])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (m2, n2, k2), (m1, n1, k1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2, k1 + k2])
    return {k: round(m, 2) for m, _, ks in blocks for k in ks}


def calibrate(runner, prompt_ids: list[int], ranks: list[int], batch: int, steps: int,
              cache: Path | None = None, key: dict | None = None, same_cost: bool = False) -> dict[int, float]:
    """Decode tokens/s at each rank with ``batch`` rows (after one warm-up step), cached by ``key``,
    made non-increasing in the rank (:func:`non_increasing`; the raw measurement is logged).

    ``same_cost`` (``--merge-rank auto``): a batch at rank k runs with rank k merged, i.e. exactly
    the base model's operations whatever k is; one measurement (at the merged rank) stands for
    every rank, rather than several that would differ only by noise."""
    path = None
    if cache is not None and key is not None:
        versioned = {**key, "format": CALIBRATION_FORMAT}
        digest = hashlib.sha256(json.dumps(versioned, sort_keys=True).encode()).hexdigest()[:16]
        path = cache / f"calibration-{digest}.json"
        if path.is_file():
            return {int(k): v for k, v in json.loads(path.read_text()).items()}
    table = {}
    for k in [runner.adapter.merged_rank] if same_cost else ranks:
        runner.reset()
        new = runner.prefill([prompt_ids] * batch, [k] * batch)
        runner.join(new)
        tokens = new.logits.argmax(-1).tolist()
        tokens = runner.decode(tokens).argmax(-1).tolist()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens = runner.decode(tokens).argmax(-1).tolist()
        table[k] = round(batch * steps / (time.perf_counter() - t0), 2)
    runner.reset()
    if same_cost:
        table = dict.fromkeys(ranks, table[runner.adapter.merged_rank])
    else:
        log.info("calibration, measured decode tokens/s per rank: %s", table)
        table = non_increasing(table)
    if path is not None:
        from trainer.checkpoint import atomic_write_json

        atomic_write_json(path, {str(k): v for k, v in table.items()})
    return table


def cache_key(settings, meta: dict, device, dtype, gemm: str = "standard") -> dict:
    """What a measurement depends on: a change to any of these measures again (the CPU and its
    thread count too: a table measured under ``OMP_NUM_THREADS=1`` is not this server's)."""
    import torch

    from trainer.models import cpu_model_name

    return {"model": settings.model, "adapter": meta.get("adapter_sha256"), "device": str(device),
            "dtype": str(dtype), "batch": settings.max_batch_size, "steps": settings.calibrate_steps,
            "merge_rank": settings.merge_rank, "fuse": settings.fuse, "gemm": gemm,
            "decode": settings.decode, "compile": settings.compile, "threads": torch.get_num_threads(),
            "cpu": cpu_model_name() if str(device) == "cpu" else str(device)}
