"""The comparison's ``report.md``: markdown rendering only, from what ``discover``, ``tables`` and ``curves``
computed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from nnunetv2_llm.evaluation.compare.curves import Curves
from nnunetv2_llm.evaluation.compare.discover import Discovery, val_command
from nnunetv2_llm.evaluation.compare.tables import METRIC_TITLES, PairedTest

if TYPE_CHECKING:
    from nnunetv2_llm.model.spec import BottleneckSpec

Epochs = Mapping[tuple[str, int], int | None]  # {(trainer, fold): epochs trained, None: unknown}


def report_markdown(
    discovery: Discovery,
    means: Mapping[tuple[int, str, str], tuple[float, float]],
    tests: Sequence[PairedTest],
    curves: Curves,
    epochs: Epochs,
    settings: Mapping[str, BottleneckSpec | str | None],
) -> str:
    """The whole report: header, warnings, what each trainer was trained with, excluded cases, conventions, means
    (``tables.means_per_trainer``), paired differences (``tables.paired_tests``), curves' sources and figures;
    ``settings``: each trainer's ``discover.trained_with``."""
    d = discovery
    lines = [
        *_header_lines(d),
        *_budget_warning(d.trainers, d.folds, epochs),
        *_settings_lines(d.trainers, d.folds, settings, epochs),
        *_validation_lines(d),
        f"Conventions: {_conventions()}",
        "",
        *_means_lines(d, means),
        *_paired_lines(d.trainers[0], tests),
        "", "## Training curves", "",
        *[f"- `{t}` fold {f}: {source}" for (t, f), (_, source) in curves.items()],
        "", "![paired differences](paired_differences.png)", "", "![training curves](training_curves.png)", "",
    ]
    return "\n".join(lines)


def _header_lines(d: Discovery) -> list[str]:
    per_fold = ", ".join(f"fold {f}: {sum(1 for pf, _ in d.paired if pf == f)}" for f in d.folds)
    return [
        f"# Trainer comparison: {d.name}, {d.configuration} ({d.plans})",
        "",
        f"Reference trainer: `{d.trainers[0]}`. Compared: {', '.join(f'`{t}`' for t in d.trainers[1:])}.",
        "",
        f"Folds: {', '.join(map(str, d.folds))}; paired cases: {len(d.paired)} ({per_fold}); "
        f"NSD tolerance: {_tolerance_text(d.tolerance, d.labels)}.",
        "",
    ]


def _conventions() -> str:
    from nnunetv2_llm.evaluation.statistics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, METRICS

    return (
        "metrics per case and class with the image spacing (MONAI). Empty masks: reference and prediction both "
        "empty -> Dice 1, NSD 1, HD95 0; exactly one empty -> Dice 0, NSD 0, HD95 = image diagonal (mm). "
        "Axes of length 1 are dropped with their spacing (a single-slice image is measured in 2D). "
        "Dice/NSD: higher is better; HD95: lower is better. Differences are trainer - reference; a case is tied "
        f"when |difference| <= {METRICS['dice'].tie_tolerance:g} (Dice, NSD) or {METRICS['hd95'].tie_tolerance:g} mm "
        f"(HD95). 95% CI: paired BCa bootstrap of the mean difference ({BOOTSTRAP_RESAMPLES} resamples, seed "
        f"{BOOTSTRAP_SEED}). p: two-sided Wilcoxon signed-rank (all differences zero -> p = 1), Holm-corrected "
        "over all tests of the paired-difference table. Means and differences use the paired cases only."
    )


def _means_lines(d: Discovery, means: Mapping[tuple[int, str, str], tuple[float, float]]) -> list[str]:
    lines = ["## Mean ± sd per trainer (paired cases)", "", f"| Class | Metric | {' | '.join(d.trainers)} |",
             "|---|---|" + "---|" * len(d.trainers)]
    for value, name in d.labels.items():
        for metric in METRIC_TITLES:
            cells = [f"{_fmt(metric, mean)} ± {_fmt(metric, sd)}"
                     for mean, sd in (means[(value, metric, t)] for t in d.trainers)]
            lines.append(f"| {name} | {METRIC_TITLES[metric]} | {' | '.join(cells)} |")
    return lines


def _paired_lines(reference: str, tests: Sequence[PairedTest]) -> list[str]:
    lines = ["", f"## Paired difference to `{reference}` (trainer - reference)", "",
             f"Holm correction over the {len(tests)} tests of this table.", "",
             "| Trainer | Class | Metric | Δ mean ± sd | 95% CI | Wilcoxon p | Holm p | better / worse / tied |",
             "|---|---|---|---|---|---|---|---|"]
    for t, name, metric, r, ph in tests:
        lines.append(
            f"| {t} | {name} | {METRIC_TITLES[metric]} | {_fmt(metric, r.mean_diff)} ± {_fmt(metric, r.sd_diff)} | "
            f"[{_fmt(metric, r.ci_low)}, {_fmt(metric, r.ci_high)}] | {_fmt_p(r.p_value)} | {_fmt_p(ph)} | "
            f"{r.better} / {r.worse} / {r.tied} |"
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
    lines = ["## What each trainer was trained with", "",
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
    lines = ["## Cases excluded from the paired analysis", "", d.split_note, ""]
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


def _fmt(metric: str, x: float) -> str:
    return "n/a" if np.isnan(x) else (f"{x:.2f}" if metric == "hd95" else f"{x:.4f}")


def _fmt_p(p: float) -> str:
    return "n/a" if np.isnan(p) else f"{p:.4g}"
