"""The comparison's figures: per-case paired differences and training curves (matplotlib and seaborn only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from nnunetv2_llm.evaluation.compare.curves import CURVES, Curves
from nnunetv2_llm.evaluation.compare.tables import METRIC_TITLES


def plot_differences(diffs: pd.DataFrame, reference: str, path: Path) -> None:
    """One panel per metric: box and strip plots of ``tables.paired_differences`` per class and trainer."""
    import seaborn as sns
    from matplotlib.figure import Figure

    from nnunetv2_llm.evaluation.statistics import METRICS

    fig = Figure(figsize=(5 * len(METRICS), 4.5), layout="constrained")
    for i, (ax, metric) in enumerate(zip(fig.subplots(1, len(METRICS)), METRICS, strict=True)):
        d = diffs[diffs["metric"] == metric]
        sns.boxplot(d, x="label_name", y="diff", hue="trainer", ax=ax, fill=False, showfliers=False,
                    legend="auto" if i == 0 else False)
        sns.stripplot(d, x="label_name", y="diff", hue="trainer", ax=ax, dodge=True, alpha=0.6, legend=False)
        ax.axhline(0, color="grey", lw=1, ls="--")
        better = "higher" if METRICS[metric].higher_is_better else "lower"
        ax.set(title=f"{METRIC_TITLES[metric]}: {better} is better", xlabel="class", ylabel=f"trainer - {reference}")
    n_cases = len(diffs[["fold", "case"]].drop_duplicates())
    fig.suptitle(f"Per-case paired differences to {reference} ({n_cases} paired cases)")
    fig.savefig(path, dpi=120)


def plot_curves(curves: Curves, trainers: Sequence[str], folds: Sequence[int], path: Path) -> None:
    """One panel per curve (``CURVES``): a colour per trainer, a line style per fold."""
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(CURVES), 4.5), layout="constrained")
    axes = fig.subplots(1, len(CURVES))
    colors = dict(zip(trainers, sns.color_palette(n_colors=len(trainers)), strict=True))
    styles = ["-", "--", ":", "-."]
    for (trainer, fold), (found, _) in curves.items():
        if found is not None:
            for ax, column in zip(axes, CURVES, strict=True):
                ax.plot(found["epoch"], found[column], color=colors[trainer],
                        ls=styles[list(folds).index(fold) % len(styles)], label=f"{trainer} fold {fold}")
    for ax, title in zip(axes, CURVES.values(), strict=True):
        ax.set(title=title, xlabel="epoch")
    if any(found is not None for found, _ in curves.values()):
        axes[0].legend(fontsize="small")
    else:
        fig.suptitle("no training checkpoints or logs found")
    fig.savefig(path, dpi=120)
