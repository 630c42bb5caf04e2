"""Head-to-head comparison of nnU-Net v2 trainers on their cross-validation predictions.

Reads, for each trainer and fold, ``$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/
fold_<f>/validation/<case><file_ending>`` and the ground truth
``$nnUNet_preprocessed/<dataset>/gt_segmentations/<case><file_ending>``, computes per-case Dice,
NSD and HD95 (``metrics``), pairs cases across trainers and writes to ``output_dir``:
``per_case_metrics.csv``, ``report.md`` (paired statistics from ``statistics`` against the first
trainer), ``paired_differences.png`` and ``training_curves.png``.

Also the ``nnunetv2_llm compare`` sub-command (``add_arguments``/``main``); heavy imports (torch,
MONAI, nnU-Net, SimpleITK, scipy, seaborn) live inside functions so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from nnunetv2_llm.errors import LLMSettingError
from nnunetv2_llm.nnunet_commands import nnunet_dataset_id

CSV_COLUMNS = [
    "trainer", "fold", "case", "label", "label_name", "dice", "nsd", "hd95", "ref_empty", "pred_empty", "paired"
]
METRIC_TITLES = {"dice": "Dice", "nsd": "NSD", "hd95": "HD95 (mm)"}  # the metrics of ``statistics.METRICS``
CURVES = {"train_loss": "train loss", "val_loss": "validation loss", "pseudo_dice": "pseudo Dice (mean foreground)"}


class CompareError(LLMSettingError):
    """The comparison cannot run; the message names what is missing and how to produce it (the CLI prints it
    on one line and exits 2, as for any bad input)."""


def compare(
    dataset: str | int,
    configuration: str,
    trainers: Sequence[str],
    folds: Sequence[int],
    output_dir: Path,
    plans: str = "nnUNetPlans",
    nsd_tolerance_mm: float | Mapping[int, float] | None = None,
    results_root: Path | None = None,
    preprocessed_root: Path | None = None,
    workers: int = 2,
) -> Path:
    """Compare trainers on the validation cases of ``folds``; the first trainer is the reference.

    ``results_root``/``preprocessed_root`` default to nnU-Net's ``nnUNet_results``/``nnUNet_preprocessed``.
    ``nsd_tolerance_mm`` is one value or ``{label value: mm}`` (None: ``metrics.DEFAULT_NSD_TOLERANCE_MM``,
    also for labels missing from the mapping). ``workers`` > 1 evaluates cases in a
    spawned process pool; each worker first imports torch/MONAI (several seconds), so it pays off
    only for many or large cases. Returns the path of ``report.md``.
    Raises ``CompareError`` when a trainer/fold has no validation output (naming the command to run).
    """
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    from nnunetv2_llm.metrics import DEFAULT_NSD_TOLERANCE_MM

    if nsd_tolerance_mm is None:
        nsd_tolerance_mm = DEFAULT_NSD_TOLERANCE_MM
    if len(trainers) < 2 or len(set(trainers)) != len(trainers):
        raise CompareError(f"give at least two distinct trainers (the first is the reference), got {list(trainers)}")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise CompareError(f"cannot resolve dataset {dataset!r}: {e}") from e
    results = _root(results_root, "nnUNet_results") / name
    preprocessed = _root(preprocessed_root, "nnUNet_preprocessed") / name
    trainer_dirs = {t: results / convert_trainer_plans_config_to_identifier(t, plans, configuration) for t in trainers}
    command = _command_prefix(name, configuration, plans)
    dataset_json = _dataset_json(trainer_dirs, preprocessed)
    labels, ignore_label = _labels(dataset_json)
    found = _validation_predictions(trainer_dirs, folds, command, dataset_json.get("file_ending", ".nii.gz"))
    paired, excluded = _pair_cases(found, trainers, folds)

    gt_dir = preprocessed / "gt_segmentations"
    tasks = []
    for (trainer, fold), cases in found.items():
        for case, pred_path in cases.items():
            gt_path = gt_dir / pred_path.name
            if not gt_path.is_file():
                raise CompareError(
                    f"ground truth {gt_path} is missing; run nnUNetv2_plan_and_preprocess -d {nnunet_dataset_id(name)}"
                )
            tasks.append((trainer, fold, case, pred_path, gt_path, list(labels), ignore_label, nsd_tolerance_mm))
    df = pd.DataFrame([row for rows in _map(_evaluate_case, tasks, workers) for row in rows])
    df["label_name"] = df["label"].map(labels)
    df["paired"] = [(f, c) in paired for f, c in zip(df["fold"], df["case"])]
    df = df.sort_values(["trainer", "fold", "case", "label"], key=_trainer_order(trainers))[CSV_COLUMNS]

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(output_dir / "per_case_metrics.csv", index=False)
    diffs = _paired_differences(df[df["paired"]], trainers)
    curves = {(t, f): training_curves(trainer_dirs[t] / f"fold_{f}") for t in trainers for f in folds}
    _plot_differences(diffs, trainers[0], output_dir / "paired_differences.png")
    _plot_curves(curves, trainers, folds, output_dir / "training_curves.png")
    report = output_dir / "report.md"
    header = dict(name=name, configuration=configuration, plans=plans, folds=folds, tolerance=nsd_tolerance_mm)
    report.write_text(_report(df[df["paired"]], diffs, trainers, labels, paired, excluded, curves, header))
    return report


def training_curves(fold_dir: Path) -> tuple[pd.DataFrame, str] | None:
    """Per-epoch ``epoch, train_loss, val_loss, pseudo_dice`` of one fold and where they came from.

    Source order: ``checkpoint_final.pth`` (key ``'logging'``), the ``training_log_*.txt`` files
    (a running training logs every epoch), ``checkpoint_latest.pth``; None when there is none.
    """
    final, latest = fold_dir / "checkpoint_final.pth", fold_dir / "checkpoint_latest.pth"
    logs = sorted(fold_dir.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    if final.is_file():
        return _curves_from_checkpoint(final), final.name
    if logs:
        return _curves_from_logs(logs), "training_log_*.txt"
    if latest.is_file():
        return _curves_from_checkpoint(latest), latest.name
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name, e.g. 4 or Dataset004_Hippocampus")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True,
                        help="trainer class names; the first is the reference, e.g. nnUNetTrainer nnUNetTrainerLLM")
    parser.add_argument("-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("--nsd-tolerance-mm", nargs="+", default=None, metavar="MM|LABEL=MM",
                        help="NSD tolerance: one value in mm for every class, or LABEL=MM per label value "
                             "(others 1.0); default 1.0")
    parser.add_argument("-o", "--output-dir", type=Path, default=None,
                        help="default: reports/compare_<dataset>_<configuration>")
    parser.add_argument("--workers", type=int, default=2, help="processes for the metric computation")


def main(args: argparse.Namespace) -> int:
    output_dir = args.output_dir or Path("reports") / f"compare_{args.dataset}_{args.configuration}"
    report = compare(args.dataset, args.configuration, args.trainers, args.folds, output_dir, args.plans,
                     _parse_tolerance(args.nsd_tolerance_mm), workers=args.workers)
    print(f"report: {report}")
    return 0


def _parse_tolerance(values: Sequence[str] | None) -> float | dict[int, float] | None:
    if not values:
        return None
    try:
        if len(values) == 1 and "=" not in values[0]:
            return float(values[0])
        return {int(label): float(mm) for label, mm in (v.split("=") for v in values)}
    except ValueError:
        raise CompareError(f"--nsd-tolerance-mm: give one number or LABEL=MM pairs, got {' '.join(values)}") from None


def _root(given: Path | None, env: str) -> Path:
    from nnunetv2 import paths as nnunet_paths

    if given is not None:
        return Path(given)
    try:
        return Path(os.fspath(getattr(nnunet_paths, env)))
    except (RuntimeError, TypeError) as e:
        raise CompareError(f"{env} is not set: export {env}=/path/to/{env} (see nnU-Net's setting_up_paths.md)") from e


def _command_prefix(dataset_name: str, configuration: str, plans: str) -> str:
    plans_arg = "" if plans == "nnUNetPlans" else f" -p {plans}"
    return f"nnUNetv2_train {nnunet_dataset_id(dataset_name)} {configuration} {{fold}} -tr {{trainer}}{plans_arg}"


def _dataset_json(trainer_dirs: Mapping[str, Path], preprocessed: Path) -> dict:
    from nnunetv2_llm.dataset_checks import load_dataset_json

    candidates = [d / "dataset.json" for d in trainer_dirs.values()] + [preprocessed / "dataset.json"]
    for path in candidates:
        if path.is_file():
            return load_dataset_json(path.parent)
    raise CompareError(f"no dataset.json found; looked at {', '.join(map(str, candidates))}")


def _labels(dataset_json: dict) -> tuple[dict[int, str], int | None]:
    """Foreground ``{value: name}`` and the ignore label value (or None) from dataset.json."""
    if not isinstance(dataset_json.get("labels"), dict):
        raise CompareError("dataset.json has no 'labels' mapping (nnU-Net's {name: value}); use the dataset's own "
                           "dataset.json from nnUNet_raw or nnUNet_preprocessed")
    raw = {name: value for name, value in dataset_json["labels"].items() if name != "background"}
    ignore = raw.pop("ignore", None)
    if any(not isinstance(v, int) for v in raw.values()):
        raise CompareError("region-based labels (lists in dataset.json 'labels') are not supported by compare")
    return {v: name for name, v in raw.items()}, ignore


def _validation_predictions(
    trainer_dirs: Mapping[str, Path], folds: Sequence[int], command: str, ending: str
) -> dict[tuple[str, int], dict[str, Path]]:
    """``{(trainer, fold): {case: prediction path}}``; CompareError listing every fold without predictions."""
    found, missing = {}, []
    for trainer, tdir in trainer_dirs.items():
        for fold in folds:
            fold_dir = tdir / f"fold_{fold}"
            preds = sorted((fold_dir / "validation").glob(f"*{ending}"))
            found[(trainer, fold)] = {p.name[: -len(ending)]: p for p in preds}
            if preds:
                continue
            cmd = command.format(fold=fold, trainer=trainer)
            if (fold_dir / "checkpoint_final.pth").is_file():
                why, cmd = "training finished (checkpoint_final.pth) but validation was not run", cmd + " --val"
            elif (fold_dir / "checkpoint_latest.pth").is_file():
                why, cmd = "training has not finished (only checkpoint_latest.pth)", cmd + " --c"
            else:
                why = "this fold has not been trained"
            missing.append(f"- {fold_dir / 'validation'}: no predictions; {why}. Run: {cmd}")
    if missing:
        raise CompareError("validation output missing:\n" + "\n".join(missing))
    return found


def _pair_cases(
    found: Mapping[tuple[str, int], Mapping[str, Path]], trainers: Sequence[str], folds: Sequence[int]
) -> tuple[set[tuple[int, str]], list[tuple[int, str, list[str]]]]:
    """Cases present for every trainer, and ``(fold, case, trainers lacking it)`` for the others."""
    paired, excluded = set(), []
    for fold in folds:
        sets = {t: set(found[(t, fold)]) for t in trainers}
        common = set.intersection(*sets.values())
        paired |= {(fold, c) for c in common}
        for case in sorted(set.union(*sets.values()) - common):
            excluded.append((fold, case, [t for t in trainers if case not in sets[t]]))
    if not paired:
        raise CompareError("no validation case is present for all trainers; nothing to compare")
    return paired, excluded


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Array in numpy order (z, y, x) and spacing in the same order (SimpleITK reports x, y, z)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


def _evaluate_case(task: tuple) -> list[dict]:
    from nnunetv2_llm.metrics import case_metrics

    trainer, fold, case, pred_path, gt_path, labels, ignore_label, tolerance = task
    pred, pred_spacing = _read(pred_path)
    ref, spacing = _read(gt_path)
    if pred.shape != ref.shape or not np.allclose(pred_spacing, spacing, rtol=1e-3):
        raise CompareError(
            f"{pred_path} (shape {pred.shape}, spacing {pred_spacing}) does not match its ground truth "
            f"{gt_path} (shape {ref.shape}, spacing {spacing})"
        )
    if ignore_label is not None:  # voxels marked 'ignore' in the reference do not count
        pred = np.where(ref == ignore_label, 0, pred)
    rows = case_metrics(pred, ref, spacing, labels, tolerance)
    return [{"trainer": trainer, "fold": fold, "case": case, **row} for row in rows]


def _map(fn, tasks: list, workers: int) -> list:
    if workers <= 1 or len(tasks) < 2:
        return [fn(t) for t in tasks]
    with get_context("spawn").Pool(workers) as pool:  # spawn: fork is unsafe once torch has started threads
        return pool.map(fn, tasks)


def _trainer_order(trainers: Sequence[str]):
    rank = {t: i for i, t in enumerate(trainers)}
    return lambda col: col.map(rank) if col.name == "trainer" else col


def _paired_differences(paired_df: pd.DataFrame, trainers: Sequence[str]) -> pd.DataFrame:
    """Long table ``trainer, fold, case, label, label_name, metric, candidate, reference, diff``."""
    key = ["fold", "case", "label", "label_name"]
    melt = dict(value_vars=list(METRIC_TITLES), var_name="metric")
    ref = paired_df[paired_df["trainer"] == trainers[0]].melt(id_vars=key, value_name="reference", **melt)
    cand = paired_df[paired_df["trainer"] != trainers[0]]
    cand = cand.melt(id_vars=["trainer", *key], value_name="candidate", **melt)
    out = cand.merge(ref, on=[*key, "metric"], validate="many_to_one")
    out["diff"] = out["candidate"] - out["reference"]
    return out


def _curves_from_checkpoint(path: Path) -> pd.DataFrame:
    from nnunetv2_llm.trainers.reliability import load_checkpoint_file  # weights_only: nothing in it can run code

    log = load_checkpoint_file(path)["logging"]
    columns = {"train_loss": "train_losses", "val_loss": "val_losses", "pseudo_dice": "mean_fg_dice"}
    n = min(len(log[k]) for k in columns.values())
    return pd.DataFrame({"epoch": range(n), **{c: np.asarray(log[k][:n], dtype=float) for c, k in columns.items()}})


_EPOCH = re.compile(r": Epoch (\d+)\s*$")
_VALUES = {"train_loss": re.compile(r": train_loss (\S+)"), "val_loss": re.compile(r": val_loss (\S+)")}
_PSEUDO_DICE = re.compile(r": Pseudo dice \[(.*)\]")


def _curves_from_logs(logs: Sequence[Path]) -> pd.DataFrame:
    """Parse nnU-Net text logs; a later log (resumed training) overrides the epochs it repeats."""
    epochs: dict[int, dict[str, float]] = {}
    current = None
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            if m := _EPOCH.search(line):
                current = int(m[1])
                epochs[current] = {}
            elif current is not None:
                for key, pattern in _VALUES.items():
                    if m := pattern.search(line):
                        epochs[current][key] = float(m[1])
                if m := _PSEUDO_DICE.search(line):  # e.g. "[np.float32(0.81), np.float32(0.7)]"
                    values = [float(v) for v in re.sub(r"np\.\w+\(([^)]*)\)", r"\1", m[1]).split(",") if v.strip()]
                    epochs[current]["pseudo_dice"] = float(np.nanmean(values)) if values else np.nan
    rows = [{"epoch": e, **epochs[e]} for e in sorted(epochs)]
    return pd.DataFrame(rows, columns=["epoch", *CURVES])


def _plot_differences(diffs: pd.DataFrame, reference: str, path: Path) -> None:
    import seaborn as sns
    from matplotlib.figure import Figure

    from nnunetv2_llm.statistics import METRICS

    fig = Figure(figsize=(5 * len(METRICS), 4.5), layout="constrained")
    for i, (ax, metric) in enumerate(zip(fig.subplots(1, len(METRICS)), METRICS)):
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


def _plot_curves(
    curves: Mapping[tuple[str, int], tuple[pd.DataFrame, str] | None],
    trainers: Sequence[str],
    folds: Sequence[int],
    path: Path,
) -> None:
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(CURVES), 4.5), layout="constrained")
    axes = fig.subplots(1, len(CURVES))
    colors = dict(zip(trainers, sns.color_palette(n_colors=len(trainers))))
    styles = ["-", "--", ":", "-."]
    for (trainer, fold), found in curves.items():
        if found is not None:
            for ax, column in zip(axes, CURVES):
                ax.plot(found[0]["epoch"], found[0][column], color=colors[trainer],
                        ls=styles[list(folds).index(fold) % len(styles)], label=f"{trainer} fold {fold}")
    for ax, title in zip(axes, CURVES.values()):
        ax.set(title=title, xlabel="epoch")
    if any(c is not None for c in curves.values()):
        axes[0].legend(fontsize="small")
    else:
        fig.suptitle("no training checkpoints or logs found")
    fig.savefig(path, dpi=120)


def _fmt(metric: str, x: float) -> str:
    return "n/a" if np.isnan(x) else (f"{x:.2f}" if metric == "hd95" else f"{x:.4f}")


def _fmt_p(p: float) -> str:
    return "n/a" if np.isnan(p) else f"{p:.4g}"


def _tolerance_text(tolerance: float | Mapping[int, float], labels: Mapping[int, str]) -> str:
    from nnunetv2_llm.metrics import DEFAULT_NSD_TOLERANCE_MM

    if not isinstance(tolerance, Mapping):
        return f"{tolerance:g} mm"
    return ", ".join(f"{name} {tolerance.get(v, DEFAULT_NSD_TOLERANCE_MM):g} mm" for v, name in labels.items())


def _report(
    paired_df: pd.DataFrame,
    diffs: pd.DataFrame,
    trainers: Sequence[str],
    labels: Mapping[int, str],
    paired: set[tuple[int, str]],
    excluded: list[tuple[int, str, list[str]]],
    curves: Mapping[tuple[str, int], tuple[pd.DataFrame, str] | None],
    header: dict,
) -> str:
    from nnunetv2_llm.statistics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, METRICS, holm, mean_sd, paired_comparison

    ref, folds = trainers[0], header["folds"]
    conventions = (
        "metrics per case and class with the image spacing (MONAI). Empty masks: reference and prediction both "
        "empty -> Dice 1, NSD 1, HD95 0; exactly one empty -> Dice 0, NSD 0, HD95 = image diagonal (mm). "
        "Dice/NSD: higher is better; HD95: lower is better. Differences are trainer - reference; a case is tied "
        f"when |difference| <= {METRICS['dice'].tie_tolerance:g} (Dice, NSD) or {METRICS['hd95'].tie_tolerance:g} mm "
        f"(HD95). 95% CI: paired BCa bootstrap of the mean difference ({BOOTSTRAP_RESAMPLES} resamples, seed "
        f"{BOOTSTRAP_SEED}). p: two-sided Wilcoxon signed-rank (all differences zero -> p = 1), Holm-corrected "
        "over all tests of the paired-difference table. Means and differences use the paired cases only."
    )
    per_fold = ", ".join(f"fold {f}: {sum(1 for pf, _ in paired if pf == f)}" for f in folds)
    lines = [
        f"# Trainer comparison: {header['name']}, {header['configuration']} ({header['plans']})",
        "",
        f"Reference trainer: `{ref}`. Compared: {', '.join(f'`{t}`' for t in trainers[1:])}.",
        "",
        f"Folds: {', '.join(map(str, folds))}; paired cases: {len(paired)} ({per_fold}); "
        f"NSD tolerance: {_tolerance_text(header['tolerance'], labels)}.",
        "",
        f"Conventions: {conventions}",
        "",
        "## Cases excluded from the paired analysis",
        "",
    ]
    lines += [f"- fold {f}, `{c}`: no prediction from {', '.join(missing)}" for f, c, missing in excluded] or [
        "None: every validation case has a prediction from every trainer."
    ]
    lines += ["", "## Mean ± sd per trainer (paired cases)", "", f"| Class | Metric | {' | '.join(trainers)} |",
              "|---|---|" + "---|" * len(trainers)]
    for value, name in labels.items():
        for metric in METRICS:
            cells = []
            for t in trainers:
                mean, sd = mean_sd(paired_df.loc[(paired_df["trainer"] == t) & (paired_df["label"] == value), metric])
                cells.append(f"{_fmt(metric, mean)} ± {_fmt(metric, sd)}")
            lines.append(f"| {name} | {METRIC_TITLES[metric]} | {' | '.join(cells)} |")

    results = []
    for t in trainers[1:]:
        for value, name in labels.items():
            for metric in METRICS:
                g = diffs[(diffs["trainer"] == t) & (diffs["label"] == value) & (diffs["metric"] == metric)]
                r = paired_comparison(g["candidate"].to_numpy(), g["reference"].to_numpy(), metric)
                results.append((t, name, metric, r))
    p_holm = holm([r.p_value for *_, r in results])
    lines += ["", f"## Paired difference to `{ref}` (trainer - reference)", "",
              f"Holm correction over the {len(results)} tests of this table.", "",
              "| Trainer | Class | Metric | Δ mean ± sd | 95% CI | Wilcoxon p | Holm p | better / worse / tied |",
              "|---|---|---|---|---|---|---|---|"]
    for (t, name, metric, r), ph in zip(results, p_holm):
        lines.append(
            f"| {t} | {name} | {METRIC_TITLES[metric]} | {_fmt(metric, r.mean_diff)} ± {_fmt(metric, r.sd_diff)} | "
            f"[{_fmt(metric, r.ci_low)}, {_fmt(metric, r.ci_high)}] | {_fmt_p(r.p_value)} | {_fmt_p(ph)} | "
            f"{r.better} / {r.worse} / {r.tied} |"
        )
    lines += ["", "## Training curves", ""]
    lines += [f"- `{t}` fold {f}: {found[1] if found else 'no checkpoint or training log found'}"
              for (t, f), found in curves.items()]
    lines += ["", "![paired differences](paired_differences.png)", "", "![training curves](training_curves.png)", ""]
    return "\n".join(lines)
