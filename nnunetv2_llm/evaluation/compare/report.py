"""The comparison's ``report.md``: markdown rendering only, from what ``run`` (``discover``, ``tables``,
``curves``, ``compute``) and ``ranking`` computed; the ranking, seed and compute sections are in
``report_runs``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from nnunetv2_llm.evaluation.compare.discover import Discovery, val_command
from nnunetv2_llm.evaluation.compare.report_runs import compute_lines, fmt, ranking_lines, seed_spread_lines
from nnunetv2_llm.evaluation.compare.tables import METRIC_TITLES, PairedTest

if TYPE_CHECKING:
    import pandas as pd

    from nnunetv2_llm.evaluation.compare.run import DatasetResult
    from nnunetv2_llm.model.spec import BottleneckSpec

Epochs = Mapping[tuple[str, int], int | None]  # {(trainer, fold): epochs trained, None: unknown}


def report_markdown(results: Sequence[DatasetResult], ranking: pd.DataFrame, nsd_method: str) -> str:
    """The whole report: a section per dataset (``dataset_lines``), the rankings across datasets, compute per
    trainer and the conventions (how seeds enter, the NSD convention, which p-value method each test used).

    Args:
        results: ``run.DatasetResult`` per dataset, in the order given.
        ranking: ``ranking.ranking_table``.
        nsd_method: ``"surface"`` or ``"boundary"``.

    Returns:
        The markdown text.
    """
    first, trainers, seeds = results[0].discovery, results[0].trainers, results[0].seeds
    names = ", ".join(r.discovery.name for r in results)
    lines = [f"# Trainer comparison: {names}, {first.configuration} ({first.plans})", "",
             f"Reference trainer: `{trainers[0]}`. Compared: {', '.join(f'`{t}`' for t in trainers[1:])}."
             + ("" if seeds is None else f" Seeds: {', '.join(map(str, seeds))} (model folders `<trainer>_seed<K>`)."),
             "", f"Conventions: {_conventions(nsd_method, seeds is not None)}", ""]
    for r in results:
        lines += dataset_lines(r)
    lines += [*ranking_lines(ranking, trainers, len(results)), *compute_lines(results),
              "![paired differences](paired_differences.png)", "", "![training curves](training_curves.png)", ""]
    return "\n".join(lines)


def dataset_lines(r: DatasetResult) -> list[str]:
    """One dataset's section: header, warnings, what each model folder was trained with, excluded cases, means,
    paired differences (seed means per case), the seed spread and the curves' sources."""
    d = r.discovery
    return [
        *_header_lines(d),
        *_budget_warning(d.trainers, d.folds, r.epochs),
        *_settings_lines(d.trainers, d.folds, r.settings, r.epochs),
        *_validation_lines(d),
        *_means_lines(d, r.trainers, r.means),
        *_paired_lines(r.trainers[0], r.tests),
        *([] if r.spread is None else seed_spread_lines(r.spread, r.trainers, d.labels)),
        "", "### Training curves", "",
        *[f"- `{t}` fold {f}: {source}" for (t, f), (_, source) in r.curves.items()],
        "",
    ]


def _header_lines(d: Discovery) -> list[str]:
    per_fold = ", ".join(f"fold {f}: {sum(1 for pf, _ in d.paired if pf == f)}" for f in d.folds)
    return [
        f"## {d.name}",
        "",
        f"Folds: {', '.join(map(str, d.folds))}; paired cases: {len(d.paired)} ({per_fold}); "
        f"NSD tolerance: {_tolerance_text(d.tolerance, d.labels)}.",
        "",
    ]


def _conventions(nsd_method: str, seeded: bool) -> str:
    from nnunetv2_llm.evaluation.statistics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, METRICS, WILCOXON_METHODS

    nsd = {"surface": "surface-element NSD of Nikolov et al. (each surface element weighted by its area; "
                      "DeepMind's surface-distance, MONAI `use_subvoxels=True`)",
           "boundary": "boundary-voxel NSD (each boundary voxel counted once, as MetricsReloaded; 0.01 to 0.04 "
                       "lower than the surface-element NSD on smooth shapes)"}[nsd_method]
    seeds = ("Seeds: each trainer's metric per case is the mean over its seeds, so every case enters a paired test "
             "once per trainer (seeds of one trainer are not independent cases: counting each seed as a case would "
             "shrink the p-values without new patients); the seed spread table shows the run-to-run variation. "
             if seeded else "")
    methods = "; ".join(f"{k}: {v}" for k, v in WILCOXON_METHODS.items())
    return (
        f"NSD (`--nsd-method {nsd_method}`): {nsd}. "
        "Metrics per case and class with the image spacing (MONAI). Empty masks: reference and prediction both "
        "empty -> Dice 1, NSD 1, HD95 0; exactly one empty -> Dice 0, NSD 0, HD95 = image diagonal (mm). "
        "Axes of length 1 are dropped with their spacing (a single-slice image is measured in 2D). "
        "Dice/NSD: higher is better; HD95: lower is better. Differences are trainer - reference; a case is tied "
        f"when |difference| <= {METRICS['dice'].tie_tolerance:g} (Dice, NSD) or {METRICS['hd95'].tie_tolerance:g} mm "
        f"(HD95). 95% CI: paired BCa bootstrap of the mean difference ({BOOTSTRAP_RESAMPLES} resamples, seed "
        f"{BOOTSTRAP_SEED}). {seeds}p: two-sided Wilcoxon signed-rank, zero differences dropped, Holm-corrected "
        f"over all tests of a dataset's paired-difference table; the table's last column names the p-value's "
        f"method ({methods}). Means and differences use the paired cases only."
    )


def _means_lines(d: Discovery, trainers: Sequence[str],
                 means: Mapping[tuple[int, str, str], tuple[float, float]]) -> list[str]:
    lines = ["### Mean ± sd per trainer (paired cases)", "", f"| Class | Metric | {' | '.join(trainers)} |",
             "|---|---|" + "---|" * len(trainers)]
    for value, name in d.labels.items():
        for metric in METRIC_TITLES:
            cells = [f"{fmt(metric, mean)} ± {fmt(metric, sd)}"
                     for mean, sd in (means[(value, metric, t)] for t in trainers)]
            lines.append(f"| {name} | {METRIC_TITLES[metric]} | {' | '.join(cells)} |")
    return lines


def _paired_lines(reference: str, tests: Sequence[PairedTest]) -> list[str]:
    lines = ["", f"### Paired difference to `{reference}` (trainer - reference)", "",
             f"Holm correction over the {len(tests)} tests of this table.", "",
             "| Trainer | Class | Metric | Δ mean ± sd | 95% CI | Wilcoxon p | Holm p | better / worse / tied | "
             "p method |", "|---|---|---|---|---|---|---|---|---|"]
    for t, name, metric, r, ph in tests:
        lines.append(
            f"| {t} | {name} | {METRIC_TITLES[metric]} | {fmt(metric, r.mean_diff)} ± {fmt(metric, r.sd_diff)} | "
            f"[{fmt(metric, r.ci_low)}, {fmt(metric, r.ci_high)}] | {_fmt_p(r.p_value)} | {_fmt_p(ph)} | "
            f"{r.better} / {r.worse} / {r.tied} | {r.p_method} |"
        )
    return lines


def _budget_warning(trainers: Sequence[str], folds: Sequence[int], epochs: Epochs) -> list[str]:
    """A visible warning line when, in some fold, the trainers were trained for different numbers of epochs."""
    unequal = []
    for fold in folds:
        known = {t: epochs[(t, fold)] for t in trainers if epochs[(t, fold)] is not None}
        if len(set(known.values())) > 1:
            unequal.append(f"fold {fold}: " + ", ".join(f"{t} {n}" for t, n in known.items()) + " epochs")
    if not unequal:
        return []
    return [f"**Warning: unequal training budgets** ({'; '.join(unequal)}): trainers trained for different numbers "
            "of epochs are not compared on equal terms; give every trainer the same budget variant.", ""]


def _settings_lines(trainers: Sequence[str], folds: Sequence[int], settings: Mapping[str, BottleneckSpec | str | None],
                    epochs: Epochs) -> list[str]:
    """The table of what each trainer folder was trained with."""
    lines = ["### What each trainer was trained with", "",
             "LLM block from the model folder's plans.json (key `nnunetv2_llm`); epochs trained = length of the "
             "training curves (see Training curves).", "",
             "| Trainer | LLM mixer | source | layer | layer dtype | layer sha256 | epochs trained |",
             "|---|---|---|---|---|---|---|"]
    for t in trainers:
        counts = ["?" if epochs[(t, f)] is None else str(epochs[(t, f)]) for f in folds]
        epochs_cell = counts[0] if len(set(counts)) == 1 else ", ".join(
            f"fold {f}: {n}" for f, n in zip(folds, counts, strict=True))
        lines.append(f"| {t} | {' | '.join(_llm_cells(settings[t]))} | {epochs_cell} |")
    return [*lines, ""]


def _llm_cells(spec: BottleneckSpec | str | None) -> list[str]:
    """LLM mixer, source, layer, the layer's dtype and sha256 (first 12 digits); '-' for a plain nnU-Net trainer,
    the problem and '?' where plans.json cannot tell."""
    if spec is None:
        return ["-"] * 5
    if isinstance(spec, str):
        return [spec, "?", "?", "?", "?"]
    lora = f" + LoRA rank {spec.lora_rank}" if spec.lora_rank else ""
    return [f"{spec.mixer}{lora}", f"`{spec.source}`", str(spec.layer),
            spec.dtype if spec.mixer != "identity" else "-", (spec.layer_sha256 or "-")[:12]]


def _validation_lines(d: Discovery) -> list[str]:
    """Expected cases without a prediction from every trainer, and validation runs that did not finish."""
    lines = ["### Cases excluded from the paired analysis", "", d.split_note, ""]
    lines += [f"- fold {f}, `{c}`: no prediction from {', '.join(missing)}. Regenerate: "
              + "; ".join(f"`{val_command(d.command, f, t)}`" for t in missing) for f, c, missing in d.excluded]
    if not d.excluded:
        every = "expected" if all(cases is not None for cases in d.expected.values()) else "found"
        lines.append(f"None: every {every} validation case has a prediction from every trainer.")
    if d.unfinished:
        lines += ["", "Validation runs that did not finish (their missing cases are listed above):", ""]
        lines += [f"- `{t}` fold {f}: no validation/summary.json (nnU-Net's validation did not finish); rerun "
                  f"`{val_command(d.command, f, t)}`" for t, f in d.unfinished]
    return [*lines, ""]


def _tolerance_text(tolerance: float | Mapping[int, float], labels: Mapping[int, str]) -> str:
    from nnunetv2_llm.evaluation.metrics.per_case import DEFAULT_NSD_TOLERANCE_MM

    if not isinstance(tolerance, Mapping):
        return f"{tolerance:g} mm"
    return ", ".join(f"{name} {tolerance.get(v, DEFAULT_NSD_TOLERANCE_MM):g} mm" for v, name in labels.items())


def _fmt_p(p: float) -> str:
    return "n/a" if np.isnan(p) else f"{p:.4g}"
