"""The comparison's figures: per-case paired differences and training curves, a row of panels per dataset
(matplotlib and seaborn only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from nnunetv2_llm.evaluation.compare.curves import CURVES, Curves
from nnunetv2_llm.evaluation.compare.tables import METRIC_TITLES


def plot_differences(diffs: Mapping[str, pd.DataFrame], reference: str, path: Path) -> None:
    """Per dataset a row, per metric a panel: box and strip plots of ``tables.paired_differences`` per class and
    trainer (``diffs``: ``{dataset: differences}``)."""
    import seaborn as sns
    from matplotlib.figure import Figure

    from nnunetv2_llm.evaluation.statistics import METRICS

    fig = Figure(figsize=(5 * len(METRICS), 4.5 * len(diffs)), layout="constrained")
    axes = fig.subplots(len(diffs), len(METRICS), squeeze=False)
    for row, (dataset, found) in zip(axes, diffs.items(), strict=True):
        for i, (ax, metric) in enumerate(zip(row, METRICS, strict=True)):
            d = found[found["metric"] == metric]
            sns.boxplot(d, x="label_name", y="diff", hue="trainer", ax=ax, fill=False, showfliers=False,
                        legend="auto" if i == 0 else False)
            sns.stripplot(d, x="label_name", y="diff", hue="trainer", ax=ax, dodge=True, alpha=0.6, legend=False)
            ax.axhline(0, color="grey", lw=1, ls="--")
            better = "higher" if METRICS[metric].higher_is_better else "lower"
            n_cases = len(found[["fold", "case"]].drop_duplicates())
            ax.set(title=f"{dataset} ({n_cases} cases)\n{METRIC_TITLES[metric]}: {better} is better",
                   xlabel="class", ylabel=f"trainer - {reference}")
    fig.suptitle(f"Per-case paired differences to {reference}")
    fig.savefig(path, dpi=120)


def plot_curves(curves: Mapping[str, Curves], trainers: Sequence[str], folds: Sequence[int], path: Path) -> None:
    """Per dataset a row, per curve (``CURVES``) a panel: a colour per trainer (model folder), a line style per
    fold (``curves``: ``{dataset: curves}``)."""
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(CURVES), 4.5 * len(curves)), layout="constrained")
    axes = fig.subplots(len(curves), len(CURVES), squeeze=False)
    colors = dict(zip(trainers, sns.color_palette(n_colors=len(trainers)), strict=True))
    styles = ["-", "--", ":", "-."]
    for row, (dataset, found_curves) in zip(axes, curves.items(), strict=True):
        for (trainer, fold), (found, _) in found_curves.items():
            if found is not None:
                for ax, column in zip(row, CURVES, strict=True):
                    ax.plot(found["epoch"], found[column], color=colors[trainer],
                            ls=styles[list(folds).index(fold) % len(styles)], label=f"{trainer} fold {fold}")
        for ax, title in zip(row, CURVES.values(), strict=True):
            ax.set(title=f"{dataset}: {title}", xlabel="epoch")
        if any(found is not None for found, _ in found_curves.values()):
            row[0].legend(fontsize="small")
    if not any(found is not None for c in curves.values() for found, _ in c.values()):
        fig.suptitle("no training checkpoints or logs found")
    fig.savefig(path, dpi=120)
