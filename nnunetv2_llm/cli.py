"""``nnunetv2_llm``: the package's command line.

Each sub-command lives in its own module, which defines ``add_arguments(parser)`` and ``main(args) -> int``;
modules keep heavy imports (torch, nnU-Net) inside functions so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nnunetv2_llm.common.errors import LLMSettingError
from nnunetv2_llm.common.nnunet_commands import NnUNetCommandError

COMMANDS = {
    "info": ("nnunetv2_llm.tools.info", "show the resolved LLM source and layer, and what is missing"),
    "demo": ("nnunetv2_llm.tools.demo", "plan, train a short budget and predict on the embedded Hippocampus subset"),
    "compare": ("nnunetv2_llm.evaluation.compare.cli",
                "per-case metrics and paired statistics of trainers' validation outputs"),
    "head-to-head": ("nnunetv2_llm.evaluation.head_to_head",
                     "train what is missing (datasets x trainers x seeds x folds, in parallel or on SLURM), "
                     "then compare"),
    "benchmark": ("nnunetv2_llm.tools.benchmark.cli", "measured cost of the LLM block: step time, inference, memory"),
    "sweep-layers": ("nnunetv2_llm.evaluation.sweep_layers",
                     "train the LLM trainer for several layer indices and compare"),
    "activation-maps": ("nnunetv2_llm.tools.activation_maps.cli", "bottleneck activations before/after the LLM block"),
    "predict": ("nnunetv2_llm.tools.predict_guard", "nnUNetv2_predict with input checks and no silent overwrite"),
    "convert-datafile": ("nnunetv2_llm.tools.convert_datafile", "MedVisionLlama data_file.txt -> nnU-Net raw dataset"),
}


def build_parser(commands: dict[str, tuple[str, str]] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2_llm", description="nnU-Net v2 with a frozen LLM layer at the "
                                                                      "bottleneck: tools around nnU-Net's commands.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in commands.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(command)
        command.set_defaults(func=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Build only the requested sub-command's parser when one is named (fast, and robust to the others).
    chosen = {argv[0]: COMMANDS[argv[0]]} if argv and argv[0] in COMMANDS else COMMANDS
    args = build_parser(chosen).parse_args(argv)
    try:
        return args.func(args)
    except (LLMSettingError, NnUNetCommandError) as e:
        print(f"nnunetv2_llm: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, LLMSettingError) else 1
    except OSError as e:  # a file that cannot be read or written: one line naming it, exit 1 (an I/O failure)
        where = f": {e.filename}" if e.filename else ""
        print(f"nnunetv2_llm: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
