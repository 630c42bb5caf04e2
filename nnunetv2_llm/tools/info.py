"""``nnunetv2_llm info``: what the trainers will use, validated before any training starts."""

from __future__ import annotations

import argparse
import os

from nnunetv2_llm.common.environment import NNUNET_FOLDERS, TRAINER_LOOKUP_DIR, export_lines, ext_trainer_value
from nnunetv2_llm.llm.source import ENV_LAYER, ENV_SOURCE


def print_info(llm_source: str | None = None, llm_layer: str | None = None, exports: bool = False) -> int:
    """Print the resolved LLM choice and what the environment still lacks (exit code 0 when the LLM is valid).

    Raises LLMSettingError (turned into a one-line message by the CLI) for a bad source or layer.
    """
    if exports:
        print(export_lines())
        return 0
    from nnunetv2_llm.llm.blueprint import check_layer, layer_blueprint
    from nnunetv2_llm.model.spec import LLMChoice, make_spec

    spec = make_spec(LLMChoice("pretrained", source=llm_source, layer=llm_layer))
    config = spec.hf_config()
    blueprint = layer_blueprint(config)
    schemes = dict.fromkeys(check_layer(blueprint, config, i).scheme for i in spec.layers)
    print(f"LLM source:  {spec.source} ({spec.source_format}; from "
          f"{'--llm-source' if llm_source else ENV_SOURCE if os.environ.get(ENV_SOURCE) else 'embedded default'})")
    print(f"LLM layer:   {spec.layer_label} of {config.num_hidden_layers} "
          f"({'--llm-layer' if llm_layer else ENV_LAYER if os.environ.get(ENV_LAYER) else 'default: last'})")
    print(f"model type:  {spec.model_type}, hidden size {spec.width}, weights {spec.dtype}")
    print(f"positions:   {'; '.join(schemes)}")
    print(f"layer sha256: {spec.layer_sha256}")

    missing = []
    if str(TRAINER_LOOKUP_DIR) not in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep):
        missing.append(f"nnUNet_extTrainer does not include {TRAINER_LOOKUP_DIR}: "
                       f"export nnUNet_extTrainer='{ext_trainer_value()}'")
    missing += [f"{name} is not set" for name in NNUNET_FOLDERS if not os.environ.get(name)]
    print("nnUNet_extTrainer: " + os.environ.get("nnUNet_extTrainer", "(not set)"))
    if missing:
        print("missing:\n  - " + "\n  - ".join(missing))
        print("`eval \"$(nnunetv2_llm info --exports)\"` sets the trainers folder and any nnU-Net folder already "
              "known.")
    else:
        print("missing:     nothing")
    return 0


def family_lines(verdicts: list) -> list[str]:
    """``--list-families``'s text: the supported model types with their position scheme, then the refused ones with
    the reason (``verdicts``: ``blueprint.FamilyVerdict`` objects)."""
    accepted = [v for v in verdicts if v.accepted]
    refused = [v for v in verdicts if not v.accepted]
    width = max((len(v.model_type) for v in verdicts), default=0)
    return ([f"supported model types ({len(accepted)}; positions the layer takes):"]
            + [f"  {v.model_type:<{width}}  {v.positions}" for v in accepted]
            + [f"refused model types ({len(refused)}; judged on transformers' default config and its last layer):"]
            + [f"  {v.model_type:<{width}}  {v.refusal}" for v in refused])


def print_families() -> int:
    """Print every transformers language-model family, supported or refused (built on the meta device only)."""
    from nnunetv2_llm.llm.family_list import classify_families

    print("\n".join(family_lines(classify_families())))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exports", action="store_true", help="print the `export` lines a shell needs, nothing else")
    parser.add_argument("--list-families", action="store_true",
                        help="list the transformers model types whose layer can be used (with their position scheme) "
                             "and the refused ones with the reason, then exit")
    parser.add_argument("--llm-source", help="validate this LLM source (HF model folder or .gguf) instead of "
                                             "$nnUNet_LLM_SOURCE / the embedded default")
    parser.add_argument("--llm-layer", help="validate this layer index (negative counts from the end)")


def main(args: argparse.Namespace) -> int:
    if args.list_families:
        return print_families()
    return print_info(args.llm_source, args.llm_layer, exports=args.exports)
