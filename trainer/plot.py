"""``rank_curve.png``: accuracy against rank on a log2 axis, one line per checkpoint.

Two panels (strict and flexible GSM8K accuracy, in %). Each checkpoint is a labelled line over
its ranks ≥ 1; each distinct base model's rank-0 accuracy is a dashed horizontal reference.
Drawn with matplotlib's object API on the Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

import io

PANELS = (("strict", "strict match (#### n)"), ("flexible", "flexible (last number)"))


def plot_rank_curves(entries: list[dict]) -> bytes:
    """PNG bytes. ``entries``: [{"label", "model", "per_rank": {"0": {"strict", "flexible"}, "1": …}}]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS), sharey=True)
    all_ranks = sorted({int(k) for e in entries for k in e["per_rank"] if int(k) > 0})
    for ax, (metric, title) in zip(axes, PANELS):
        bases: dict[str, float] = {}
        for e in entries:
            ranks = sorted(int(k) for k in e["per_rank"] if int(k) > 0)
            ax.plot(ranks, [100 * e["per_rank"][str(k)][metric] for k in ranks], marker="o", label=e["label"])
            if "0" in e["per_rank"]:
                bases.setdefault(e.get("model", "base"), 100 * e["per_rank"]["0"][metric])
        for i, (model, acc) in enumerate(bases.items()):
            ax.axhline(acc, color="0.4", linestyle=("--", ":", "-.")[i % 3], linewidth=1,
                       label=f"base {model} (rank 0)" if len(bases) > 1 else "base model (rank 0)")
        if all_ranks:  # (only rank 0 evaluated: just the base lines)
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_ranks, [str(k) for k in all_ranks])
            ax.minorticks_off()
        ax.set_title(title)
        ax.set_xlabel("rank k")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("GSM8K accuracy (%)")
    axes[-1].legend(fontsize="small", loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
