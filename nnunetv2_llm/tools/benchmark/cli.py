"""``nnunetv2_llm benchmark``: what the LLM block costs next to nnU-Net, measured side by side in one process.

For each trainer (built the way ``nnUNetv2_train`` builds it: plans and dataset.json from
``$nnUNet_preprocessed``, trainer class found by nnU-Net's lookup, ``initialize()`` for network, optimizer and
deep-supervision loss) it measures

- the training step: ``trainer.train_step`` (forward, loss, backward, gradient clipping, optimizer step, nnU-Net's
  autocast and GradScaler on CUDA) on real batches drawn once from nnU-Net's own data loader (augmentation
  included) and cached, so data loading is not timed; trainers alternate step by step (order reversed every other
  round) so that machine drift cancels; warm-up rounds are discarded; median, quartiles and paired ratios;
- sliding-window inference: ``nnUNetPredictor.predict_sliding_window_return_logits`` (Gaussian weighting, test-time
  mirroring as nnU-Net's defaults) on a few preprocessed validation cases, same cases for every trainer, alternated;
- peak memory, each trainer in a fresh subprocess (the RSS high-water mark is per process): max RSS on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA, over building the trainer and a few training steps;
- trainable and frozen parameter counts, frozen bytes;
- FLOPs of one training step (forward + backward, ``torch.utils.flop_counter``) for the whole network and for the
  LLM block and its layer, and the floor: the layer's FLOPs at the device's measured matrix-multiply rate;
- the ATen operations the LLM block dispatches in a training step (forward and backward, ``dispatch_counts``).

``--plan-preset`` replaces the dataset by the plans nnU-Net's planner makes for a described dataset (``plan_presets``:
BraTS-sized 3d_fullres, large-image 2d, Hippocampus), timed on synthetic batches, without inference.

Writes ``benchmark.json`` (with the raw per-round times) and ``benchmark.md`` to ``--output`` and prints the
table. Step and inference verdicts judge the paired median ratio by its bootstrap 95% CI: ok, OVER, or undecided.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from nnunetv2_llm.common.nnunet_commands import (
    check_device,
    check_folds,
    check_trainer_names,
    dataset_folder,
    find_trainer_class,
    is_preprocessed,
    nnunet_dataset_id,
)
from nnunetv2_llm.common.outputs import check_report_free, write_json_and_markdown
from nnunetv2_llm.tools import benchmark
from nnunetv2_llm.tools.benchmark.plan_presets import PRESETS, preset_names
from nnunetv2_llm.tools.benchmark.report import to_markdown

DEFAULT_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerLLM", "nnUNetTrainerLLMNoLLM")
# The smallest value of each count option (the benchmark divides by or cycles through these).
COUNT_MINIMUMS = {"--iterations": 1, "--batches": 1, "--warmup": 0, "--inference-cases": 0,
                  "--inference-repeats": 0, "--memory-steps": 0, "--batch-size": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options: what to build and measure, how often, and where the report goes."""
    _add_what_arguments(parser)
    _add_how_arguments(parser)
    parser.add_argument("--preprocessed", default=None, help="nnUNet_preprocessed folder (default: the variable)")
    parser.add_argument("--output", default="nnunetv2_llm_benchmark", help="folder for benchmark.json/.md")
    parser.add_argument("--overwrite", action="store_true", help="replace benchmark.json/.md already in --output")


def _add_what_arguments(parser: argparse.ArgumentParser) -> None:
    """Dataset, trainers, device and LLM choice."""
    parser.add_argument("-d", "--dataset", default=None, help="dataset id or name (DatasetXXX_Name); or --plan-preset")
    parser.add_argument("--plan-preset", default=None, choices=preset_names(),
                        help="instead of a dataset: the plans nnU-Net's planner makes for a described dataset "
                             "(brats_3d: 128^3 patches, batch 2; large_2d: 512^2, batch 12; hippocampus: 40x56x40, "
                             "batch 9), timed on synthetic batches; no inference")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="replace the plans' batch size (default: as planned), e.g. to fit a large plan into a "
                             "CPU's memory: FLOP shares do not depend on it, tokens per step scale with it")
    parser.add_argument("-c", "--configuration", default=None,
                        help="default: 3d_fullres, or the preset's configuration")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-f", "--fold", type=int, default=0, help="fold whose validation cases are used for inference")
    parser.add_argument("-tr", "--trainers", nargs="+", default=list(DEFAULT_TRAINERS),
                        help="trainer class names; ratios are to the first (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--llm-source", default=None,
                        help="sets nnUNet_LLM_SOURCE for the LLM trainers: a model folder, a .gguf file, or "
                             "synthetic:llama-8b / synthetic:llama-1b (real layer shapes, random bf16 weights, "
                             "written once to $nnUNet_LLM_SYNTHETIC_CACHE or the temp dir); default: as set, else "
                             "the embedded SmolLM2-135M")
    parser.add_argument("--llm-layer", default=None, help="sets nnUNet_LLM_LAYER (default: as set, else the last)")


def _add_how_arguments(parser: argparse.ArgumentParser) -> None:
    """Counts and switches of the measurements."""
    parser.add_argument("--iterations", type=int, default=10, help="timed training steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per trainer first")
    parser.add_argument("--batches", type=int, default=2, help="distinct real batches drawn and cycled through")
    parser.add_argument("--synthetic-batches", action="store_true",
                        help="random batches of the planned shape instead of nnU-Net's data loader")
    parser.add_argument("--inference-cases", type=int, default=3,
                        help="preprocessed validation cases per inference round (0: skip inference)")
    parser.add_argument("--inference-repeats", type=int, default=3, help="timed inference rounds")
    parser.add_argument("--no-mirroring", action="store_true", help="inference without test-time mirroring")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="training steps in each memory subprocess (0: skip the memory measurement)")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    parser.add_argument("--nnunet-train-step", action="store_true",
                        help="time nnU-Net's own nnUNetTrainer.train_step for every trainer, bypassing trainer-level "
                             "overrides (e.g. the LLM trainers' per-step finite check, which synchronises the GPU "
                             "after the forward pass): isolates what the network itself costs")
    parser.add_argument("--compile", action="store_true",
                        help="nnUNet_compile=true: nnU-Net's torch.compile path (CUDA only; nnU-Net's own default "
                             "on CUDA). Without it nnUNet_compile=false")


def main(args: argparse.Namespace) -> int:
    """Check the inputs, measure (``run_benchmark``), write benchmark.json and benchmark.md."""
    # The trainers write logs into nnUNet_results/...; keep them out of the user's results, and remove them after.
    with tempfile.TemporaryDirectory(prefix="nnunetv2_llm_benchmark_results_") as trainer_logs:
        _prepare_environment(args, trainer_logs)
        results = benchmark.run_benchmark(args)  # looked up on the package when called, where tests replace it
    json_path, md_path = write_json_and_markdown(args.output, "benchmark", results, to_markdown(results))
    print(f"written: {json_path}, {md_path}")
    return 0


def _prepare_environment(args: argparse.Namespace, trainer_logs: str) -> None:
    """Environment for nnU-Net and the LLM trainers; set before torch is imported (OpenMP reads it once)."""
    from nnunetv2_llm.common.environment import ext_trainer_value
    from nnunetv2_llm.common.errors import LLMSettingError
    from nnunetv2_llm.llm.synthetic import resolve_synthetic

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["nnUNet_extTrainer"] = ext_trainer_value()
    _resolve_plan_source(args)
    if args.preprocessed:
        os.environ["nnUNet_preprocessed"] = str(Path(args.preprocessed).resolve())
    if not args.plan_preset and not os.environ.get("nnUNet_preprocessed"):
        raise LLMSettingError("no preprocessed data: set nnUNet_preprocessed or pass --preprocessed "
                              "(`nnunetv2_llm demo` or nnUNetv2_plan_and_preprocess makes it)", "nnUNet_preprocessed")
    os.environ["nnUNet_results"] = trainer_logs
    # Batches are drawn once, in this process: no augmentation workers competing for the cores while timing.
    os.environ["nnUNet_n_proc_DA"] = "0"
    os.environ["nnUNet_compile"] = "true" if args.compile else "false"
    _check_counts(args)
    _check_inputs(args)  # before a synthetic LLM source is written
    source = resolve_synthetic(args.llm_source)
    if source:
        os.environ["nnUNet_LLM_SOURCE"] = source
    if args.llm_layer is not None:
        os.environ["nnUNet_LLM_LAYER"] = str(args.llm_layer)
    _check_llm_choice(args.trainers, source, args.llm_layer)


def _resolve_plan_source(args: argparse.Namespace) -> None:
    """Exactly one of a dataset and a plan preset; a preset fixes the configuration and implies synthetic batches and
    no inference (it has no cases)."""
    from nnunetv2_llm.common.errors import LLMSettingError

    if bool(args.dataset) == bool(args.plan_preset):
        raise LLMSettingError("give either a dataset (-d) or --plan-preset, not both or neither", "-d / --plan-preset")
    if not args.plan_preset:
        args.configuration = args.configuration or "3d_fullres"
        return
    configuration = PRESETS[args.plan_preset].configuration
    if args.configuration not in (None, configuration):
        raise LLMSettingError(f"--plan-preset {args.plan_preset} plans {configuration}, not {args.configuration}", "-c")
    args.configuration = configuration
    args.synthetic_batches = True
    args.inference_cases = 0


def _check_counts(args: argparse.Namespace) -> None:
    from nnunetv2_llm.common.errors import LLMSettingError

    for flag, minimum in COUNT_MINIMUMS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < minimum:
            raise LLMSettingError(f"{flag} must be at least {minimum}, got {value}", flag)


def _check_inputs(args: argparse.Namespace) -> None:
    """The dataset, its plans, preprocessed data and fold, every trainer class, the output folder and the device,
    checked before anything is measured."""
    if not args.plan_preset:
        _check_dataset(args)
    check_trainer_names(args.trainers)
    check_report_free(args.output, "benchmark", args.overwrite)
    if args.device != "auto":
        check_device(args.device)


def _check_dataset(args: argparse.Namespace) -> None:
    """The dataset is preprocessed for the configuration and plans, and the fold is in its split."""
    from nnunetv2_llm.common.errors import LLMSettingError

    dataset_id = nnunet_dataset_id(args.dataset)
    folder = dataset_folder(os.environ["nnUNet_preprocessed"], dataset_id)
    if not is_preprocessed(folder, args.configuration, args.plans):  # also false without folder or dataset.json
        where = folder or f"Dataset{dataset_id:03d}_* in {os.environ['nnUNet_preprocessed']}"
        raise LLMSettingError(f"{where} is not preprocessed for {args.plans} {args.configuration}: run "
                              f"nnUNetv2_plan_and_preprocess -d {dataset_id} -c {args.configuration}",
                              "-d / -c / -p / --preprocessed")
    check_folds(folder, [args.fold])


def _check_llm_choice(trainers: list[str], source: str | None, layer: str | None) -> None:
    """The LLM source and layer index the LLM trainers will read (config only, no weights), resolved before the first
    memory probe rather than by it."""
    from nnunetv2_llm.model.spec import LLMChoice, make_spec
    from nnunetv2_llm.trainers import nnUNetTrainerLLM

    if any(issubclass(find_trainer_class(name), nnUNetTrainerLLM) for name in trainers):
        make_spec(LLMChoice("random", source=source, layer=layer))
