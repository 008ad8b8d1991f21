"""``rank_curve.png``: accuracy against rank on a log2 axis, one line per checkpoint.

Three panels: strict and flexible GSM8K accuracy (%) and answer NLL (lower is better). Each
checkpoint is a labelled line over its ranks ≥ 1; each distinct base model's rank-0 value is a
dashed horizontal reference. Metrics that were not measured (``None``: ``--no-generate``) leave
their panel empty.
Drawn with matplotlib's object API on the Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

import io

PANELS = (("strict", "strict match (#### n)", "GSM8K accuracy (%)", 100),
          ("flexible", "flexible (last number)", "GSM8K accuracy (%)", 100),
          ("nll", "answer NLL (teacher-forced)", "nats per answer token", 1))


def plot_rank_curves(entries: list[dict]) -> bytes:
    """PNG bytes. ``entries``: [{"label", "model", "per_rank": {"0": {"strict", "flexible", "nll"}, …}}]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS))
    all_ranks = sorted({int(k) for e in entries for k in e["per_rank"] if int(k) > 0})
    for ax, (metric, title, ylabel, factor) in zip(axes, PANELS):
        bases: dict[str, float] = {}
        for e in entries:
            ranks = [k for k in sorted(int(k) for k in e["per_rank"] if int(k) > 0)
                     if e["per_rank"][str(k)].get(metric) is not None]
            ax.plot(ranks, [factor * e["per_rank"][str(k)][metric] for k in ranks], marker="o", label=e["label"])
            base = e["per_rank"].get("0", {}).get(metric)
            if base is not None:
                bases.setdefault(e.get("model", "base"), factor * base)
        for i, (model, acc) in enumerate(bases.items()):
            ax.axhline(acc, color="0.4", linestyle=("--", ":", "-.")[i % 3], linewidth=1,
                       label=f"base {model} (rank 0)" if len(bases) > 1 else "base model (rank 0)")
        if all_ranks:  # (only rank 0 evaluated: just the base lines)
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_ranks, [str(k) for k in all_ranks])
            ax.minorticks_off()
        ax.set_title(title)
        ax.set_xlabel("rank k")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize="small", loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
