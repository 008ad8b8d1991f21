"""The training recipe: setup → fit → save, for LoRA, DyLoRA and MatryoshkaLoRA alike.

The method only chooses the coefficient vector (see :mod:`trainer.nested`). Runs on one device or
under ``torchrun --nproc-per-node N`` (DDP: nccl on CUDA, gloo on CPU), where only the adapter's
gradients are all-reduced.

Loss normalisation: every micro-batch's summed token loss is divided by the number of answer
tokens in the whole *global* batch (all micro-batches, all processes), which every process
computes from the data plan without communication. The gradient of a step is therefore the exact
token-mean gradient of the global batch, whatever the split into processes and accumulation steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer.checkpoint import load_adapter_weights, read_meta, save_adapter, staged_dir
from trainer.data import DATA_HELP, FACTS_SPEC, IGNORE, Example, collate, load_examples
from trainer.flags import flag_of
from trainer.inject import AdapterConfig, NestedAdapter
from trainer.models import DTYPE_HELP, load_model, resolve_device, resolve_dtype
from trainer.nested import TRAIN_METHODS, p_vector
from trainer.train_state import latest_checkpoint, read_training_state, restore_training_state, save_training_state

METRICS = "metrics.jsonl"
# fields that may differ between a run and its --resume (all others must match to continue exactly)
RankSampling = Literal["batch", "row"]
RANK_SAMPLINGS: tuple[str, ...] = get_args(RankSampling)
RESUME_FREE = ("out", "resume", "save_every", "device", "log_every", "progress", "inference_rule", "coeffs",
               "eval_data")


def _opt(default, help: str, **meta):
    """A field with its help text (the ``trainer train`` flag is generated from it)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Every option of ``trainer train`` (its flags are generated from these fields:
    :mod:`trainer.flags`); stored in the checkpoint as ``training``."""

    out: str = _opt("runs/demo", "checkpoint folder to write (servable); periodic ones go to OUT/step-NNNNNN",
                    required=True)
    model: str = _opt("smollm2-135m", "local HF folder, hub id, or smollm2-135m (embedded)")
    data: str | None = _opt(None, DATA_HELP)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # --method, --rank, --ranks, …
    rank_sampling: RankSampling = _opt("batch", "DyLoRA's rank draw: batch = one rank of R per micro-batch "
                                               "(DyLoRA's); row = every row its own, each rank of R on an equal "
                                               "share of the rows in random order, in one forward (not in the paper)")
    lr: float = _opt(1e-4, "AdamW peak learning rate (reference grid 5e-6…1e-3)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (the reference uses 0)")
    warmup_steps: int = _opt(0, "linear warmup steps, then linear decay to 0")
    epochs: int = _opt(1, "passes over the data, unless --max-steps is given")
    max_steps: int | None = _opt(None, "the run's length in optimizer steps; overrides --epochs "
                                       "(as transformers' Trainer)")
    batch_size: int = _opt(8, "examples per micro-batch per process")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_length: int = _opt(512, "tokens; longer examples are cut (and counted)")
    limit: int | None = _opt(None, "use only the first N examples")
    seed: int = _opt(42, "adapter init, data order and DyLoRA's rank draws")
    clip: float = _opt(1.0, "max gradient norm; 0 disables")
    save_every: int = _opt(0, "steps between periodic checkpoints (OUT/step-N); 0: only the final one")
    log_every: int = _opt(1, "steps between progress-bar updates")
    device: str = _opt("auto", "auto | cpu | cuda")
    dtype: str = _opt("auto", DTYPE_HELP)
    resume: str | None = _opt(None, "checkpoint folder (with training state) to continue from; 'latest': "
                                    "the newest complete one under --out")
    eval_data: str | None = _opt(None, "after training, score rank 0 and every rank of R on this data "
                                       "(greedy exact match and answer NLL, teacher-forced), print the table and "
                                       "store it in the checkpoint (the server's /ranks shows it); 'train': the "
                                       "training examples; else as --data")
    progress: bool = _opt(True, "no progress bar", flag="--no-progress")

    @classmethod
    def from_flags(cls, values: dict) -> "TrainConfig":
        """From :func:`trainer.flags.flag_values`: every bad option, the adapter's included, is
        reported in one error."""
        values = dict(values)
        problems: list[str] = []
        try:
            adapter = AdapterConfig(**values.pop("adapter"))
        except ValueError as e:
            problems.append(str(e))
            adapter = AdapterConfig(r=1)  # a stand-in, so that the other options are checked too
        cfg = cls(adapter=adapter, **values)
        problems += cfg.problems()
        if problems:
            raise ValueError("invalid training options:\n  " + "\n  ".join(problems))
        return cfg

    def problems(self) -> list[str]:
        problems = []
        if self.rank_sampling not in RANK_SAMPLINGS:
            problems.append(f"--rank-sampling must be one of {', '.join(RANK_SAMPLINGS)}, got {self.rank_sampling!r}")
        elif self.rank_sampling == "row" and self.adapter.method != "dylora":
            problems.append(f"--rank-sampling row draws DyLoRA's ranks; --method is {self.adapter.method}")
        if self.adapter.method not in TRAIN_METHODS:
            problems.append(f"--method must be one of {', '.join(TRAIN_METHODS)}, got {self.adapter.method!r}")
        for flag, value, low in [("--epochs", self.epochs, 1),
                                 ("--batch-size", self.batch_size, 1), ("--grad-accum", self.grad_accum, 1),
                                 ("--max-length", self.max_length, 2), ("--save-every", self.save_every, 0),
                                 ("--warmup-steps", self.warmup_steps, 0), ("--log-every", self.log_every, 1)]:
            if value < low:
                problems.append(f"{flag} must be >= {low}, got {value}")
        for flag, value in [("--max-steps", self.max_steps), ("--limit", self.limit)]:
            if value is not None and value < 1:
                problems.append(f"{flag} must be >= 1, got {value}")
        for flag, value in [("--data", self.data), ("--eval-data", self.eval_data)]:
            if value not in (None, "train") and not FACTS_SPEC.fullmatch(value) and not Path(value).is_file():
                problems.append(f"{flag} {value}: no such file (a JSONL path, facts:N[:SEED]"
                                + (", or 'train'" if flag == "--eval-data" else "") + ")")
        if self.data == "train":
            problems.append("--data train: 'train' names the training data only for --eval-data")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"--lr must be a positive number, got {self.lr}")
        return problems

    def validate(self) -> None:
        """Collect every bad option into one error that names the flags."""
        problems = self.problems()
        if problems:
            raise ValueError("invalid training options:\n  " + "\n  ".join(problems))


# -- distributed setup --------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device)
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return d, dev


# -- the data plan ------------------------------------------------------------------------------------------
class DataPlan:
    """Which examples each process sees at each step, fixed by (seed, epoch): resumable exactly.

    Each epoch is a seeded permutation cut into global batches of ``batch × accum × world``
    examples (a last, incomplete global batch is dropped); micro-batch ``m`` of process ``w``
    takes the ``(m·world + w)``-th block of ``batch`` examples of its global batch.
    """

    def __init__(self, examples: list[Example], cfg: TrainConfig, d: Dist):
        self.examples, self.cfg, self.d = examples, cfg, d
        self.global_batch = cfg.batch_size * cfg.grad_accum * d.world
        self.steps_per_epoch = len(examples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(examples)} examples are fewer than one global batch of {self.global_batch} "
                f"(--batch-size {cfg.batch_size} × --grad-accum {cfg.grad_accum} × {d.world} processes); "
                "lower --batch-size or give more data"
            )
        # --max-steps, when given, is the run's length and overrides --epochs (transformers' rule)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.examples), generator=g))
        return self._perm[1]

    def step(self, step: int) -> tuple[list[list[Example]], int]:
        """(this process's micro-batches, answer tokens in the whole global batch)."""
        epoch, j = divmod(step, self.steps_per_epoch)
        idx = self._order(epoch)[j * self.global_batch:(j + 1) * self.global_batch].tolist()
        batch = [self.examples[i] for i in idx]
        b, w = self.cfg.batch_size, self.d.world
        micro = [batch[(m * w + self.d.rank) * b:(m * w + self.d.rank + 1) * b] for m in range(self.cfg.grad_accum)]
        return micro, sum(e.n_targets for e in batch)

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy over answer tokens; logits (B, T, V) predict labels shifted by one."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def linear_schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def _comparable(config: dict) -> dict:
    """A stored ``training`` dict, flat, with the adapter as AdapterConfig resolves it (R filled in);
    older checkpoints kept the adapter's fields flat as rank/ranks/…/targets."""
    config = dict(config)
    adapter = config.pop("adapter", None)
    if adapter is None:  # before TrainConfig embedded AdapterConfig
        names = {"method": "method", "rank": "r", "ranks": "ranks", "scaling": "scaling",
                 "targets": "target_modules", "a_init": "a_init"}
        adapter = {new: config.pop(old) for old, new in names.items() if old in config}
    adapter = {k: v for k, v in adapter.items() if k not in ("coeffs", "inference_rule")}
    config.pop("inference_rule", None)
    return {**config, **AdapterConfig(**adapter).to_dict()}


def check_resume_config(saved: dict, cfg: TrainConfig, where: Path) -> None:
    now, then = _comparable(asdict(cfg)), _comparable(saved)
    flags = {**{f.name: flag_of(AdapterConfig, f.name) for f in fields(AdapterConfig)},
             **{f.name: flag_of(TrainConfig, f.name) for f in fields(TrainConfig)}}
    diffs = [f"{flags.get(k, k)}: checkpoint {then.get(k)!r}, now {now[k]!r}"
             for k in now if k not in RESUME_FREE and then.get(k) != now[k]]
    if diffs:
        raise ValueError(f"--resume {where}: these options differ from the run that wrote it, so it "
                         "cannot continue exactly (pass the original values):\n  " + "\n  ".join(diffs))


def log(d: Dist, msg: str) -> None:
    if d.main:
        tqdm.write(msg)


# -- the recipe ------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Path:
    """Train an adapter and write the checkpoint folder ``cfg.out``; returns its path."""
    cfg.validate()
    d, device = setup_distributed(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    out = Path(cfg.out)
    if cfg.resume == "latest":
        where, skipped = latest_checkpoint(out)
        for why in skipped:
            log(d, f"--resume latest: skipped {why}")
        cfg = replace(cfg, resume=str(where))
        log(d, f"--resume latest: {where}")
    resume_state = read_training_state(Path(cfg.resume)) if cfg.resume else None
    if resume_state is not None:
        check_resume_config(resume_state["config"], cfg, Path(cfg.resume))

    model, tok = load_model(cfg.model, device, dtype)
    examples, report = load_examples(cfg.data, tok, cfg.max_length, cfg.limit)
    log(d, report.summary())
    torch.manual_seed(cfg.seed)  # same adapter init on every process
    adapter = NestedAdapter.inject(model, cfg.adapter)
    n_train = adapter.num_trainable()
    a = adapter.config
    log(d, f"{a.method} adapter r={a.r} R={a.ranks} scaling={a.scaling} inference rule={a.inference_rule} on "
           f"{len(adapter.layers)} modules: {n_train:,} trainable parameters "
           f"({100 * n_train / adapter.num_total():.2f}% of {adapter.num_total():,})")

    if cfg.resume:
        load_adapter_weights(Path(cfg.resume), adapter)
    plan = DataPlan(examples, cfg, d)
    log(d, f"plan: {plan.total_steps} optimizer steps = {plan.total_steps / plan.steps_per_epoch:.3g} epochs of "
           f"{plan.steps_per_epoch} steps ({plan.global_batch} examples per step"
           + (", --max-steps overrides --epochs)" if cfg.max_steps is not None else ")"))
    params = adapter.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(cfg.warmup_steps, plan.total_steps))
    sampler = torch.Generator().manual_seed(cfg.seed)  # DyLoRA's rank draws
    start = 0
    if resume_state is not None:
        start = restore_training_state(resume_state, opt, sched, sampler)
        log(d, f"resumed from {cfg.resume} at step {start}")

    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    metrics = _open_metrics(out, start, d)
    meta_extra = {"training": asdict(cfg), "data": asdict(report)}
    bar = tqdm(total=plan.total_steps, initial=start, disable=not (d.main and cfg.progress),
               desc=f"train {cfg.adapter.method}", unit="step", dynamic_ncols=True)
    model.train()
    t0, tokens = time.perf_counter(), 0
    for step in range(start, plan.total_steps):
        micro, n_targets = plan.step(step)
        loss_sum = torch.zeros((), device=device)
        for m, batch in enumerate(micro):
            if cfg.adapter.method == "dylora" and cfg.rank_sampling == "row":
                adapter.set_coeffs(row_rank_coeffs(adapter.config, len(batch), sampler))  # (rows, r)
            elif cfg.adapter.method == "dylora":
                ranks = adapter.config.ranks
                adapter.set_training_coeffs(ranks[int(torch.randint(len(ranks), (1,), generator=sampler))])
            else:
                adapter.set_training_coeffs()
            t = {k: v.to(device) for k, v in collate(batch, tok.pad_token_id).items()}
            tokens += int(t["attention_mask"].sum())
            sync = net.no_sync() if d.world > 1 and m < len(micro) - 1 else contextlib.nullcontext()
            with sync, autocast:
                logits = net(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
                loss = token_loss_sum(logits, t["labels"])
            (loss * d.world / n_targets).backward()
            loss_sum += loss.detach()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if d.world > 1:
            dist.all_reduce(loss_sum)
        done = step + 1
        elapsed = time.perf_counter() - t0
        record = {"step": done, "epoch": round(plan.epoch_of(done), 4), "loss": loss_sum.item() / n_targets,
                  "lr": lr, "tokens_per_s": round(tokens * d.world / elapsed, 1), "elapsed_s": round(elapsed, 2)}
        if d.main:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if done % cfg.log_every == 0:
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if cfg.save_every and done % cfg.save_every == 0 and done < plan.total_steps:
            _save(out / f"step-{done:06d}", adapter, cfg, opt, sched, sampler, done, meta_extra, d, staged=True)
    bar.close()
    _save(out, adapter, cfg, opt, sched, sampler, plan.total_steps, meta_extra, d)
    if d.main:
        metrics.close()
    log(d, f"checkpoint written to {out}")
    adapter.set_rank(cfg.adapter.r)
    model.eval()
    if cfg.eval_data and d.main:
        _eval_ranks(out, model, tok, adapter, cfg, examples, d)
    return out


def _eval_ranks(out: Path, model, tok, adapter: NestedAdapter, cfg: TrainConfig, train_examples, d: Dist) -> None:
    from trainer.evaluate import rank_table_text, score_and_store  # evaluate imports this module

    if cfg.eval_data == "train":
        examples, name = train_examples, f"the training data ({cfg.data or '<generated demo>'})"
    else:
        examples, report = load_examples(cfg.eval_data, tok, None, None)
        name = report.path
    log(d, rank_table_text(score_and_store(out, model, tok, adapter, examples, cfg.batch_size, name, cfg.model)))


def row_rank_coeffs(a: AdapterConfig, rows: int, generator: torch.Generator) -> torch.Tensor:
    """DyLoRA with a rank per row: row i trains rank k_i's own function, coefficients s(k_i)·1_{k_i}
    (zeros past k_i), so each rank of R gets gradient from its standalone forward every step.
    The ranks cycle through R from a random start over a random order of the rows: every rank
    has ⌊rows/|R|⌋ or one more rows. Shape (rows, r), float64."""
    order = torch.randperm(rows, generator=generator)
    start = int(torch.randint(len(a.ranks), (1,), generator=generator))
    ks = [a.ranks[(start + i) % len(a.ranks)] for i in range(rows)]
    table = {k: p_vector("dylora", a.r, a.ranks, a.scaling, k) for k in a.ranks}
    return torch.stack([table[ks[j]] for j in order.tolist()])


def _open_metrics(out: Path, start: int, d: Dist):
    """metrics.jsonl for appending; on resume into the same folder, drop lines past ``start``."""
    if not d.main:
        return None
    out.mkdir(parents=True, exist_ok=True)
    path = out / METRICS
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
        path.write_text("".join(ln + "\n" for ln in kept))
    return path.open("a")


def _save(where: Path, adapter: NestedAdapter, cfg: TrainConfig, opt, sched, sampler, step: int,
          extra: dict, d: Dist, staged: bool = False) -> None:
    """The adapter's files, then the training state naming their digest. ``staged``: written
    whole beside ``where`` and renamed into place (a periodic checkpoint); the final one goes into
    ``out`` itself, beside the metrics and the periodic ones, file by file, the digests tying them."""
    if d.main:
        with staged_dir(where) if staged else contextlib.nullcontext(where) as folder:
            save_adapter(folder, adapter, cfg.model, {**extra, "step": step})
            save_training_state(folder, step, opt, sched, sampler, asdict(cfg),
                                read_meta(folder)["adapter_sha256"])
    if d.world > 1:
        dist.barrier()
