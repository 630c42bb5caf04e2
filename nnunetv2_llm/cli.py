"""``nnunetv2_llm``: the package's command line (info, demo, and the comparison tools)."""

from __future__ import annotations

import argparse
import sys

from nnunetv2_llm.errors import LLMSettingError
from nnunetv2_llm.nnunet_commands import NnUNetCommandError


def _cmd_info(args: argparse.Namespace) -> int:
    from nnunetv2_llm.info import print_info

    return print_info(args.llm_source, args.llm_layer, exports=args.exports)


def _cmd_demo(args: argparse.Namespace) -> int:
    from nnunetv2_llm.demo import run_demo

    run_demo(args.work_dir, args.trainer, args.device, args.fold)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2_llm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show the resolved LLM source and layer, and what is missing")
    info.add_argument("--exports", action="store_true", help="print the `export` lines a shell needs, nothing else")
    info.add_argument("--llm-source", help="validate this LLM source (HF model folder or .gguf) instead of "
                                           "$nnUNet_LLM_SOURCE / the embedded default")
    info.add_argument("--llm-layer", help="validate this layer index (negative counts from the end)")
    info.set_defaults(func=_cmd_info)

    demo = sub.add_parser("demo", help="plan, train a short budget and predict on the embedded Hippocampus subset")
    demo.add_argument("--work-dir", default="nnunetv2_llm_demo", help="folder for nnUNet_raw/preprocessed/results")
    demo.add_argument("--trainer", default="nnUNetTrainerLLM_5epochs_10iters")
    demo.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    demo.add_argument("--fold", default="0")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LLMSettingError as e:
        print(f"nnunetv2_llm: error: {e}", file=sys.stderr)
        return 2
    except NnUNetCommandError as e:
        print(f"nnunetv2_llm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
