"""Every tested LLM family through nnU-Net's own commands, as a user runs them.

For each family's tiny random checkpoint that the tests build (``tests/test_families.py``: safetensors;
``tests/gguf_files.py``: GGUF, Q8_0-quantised linears), on the embedded Hippocampus subset, on the CPU::

    nnUNet_LLM_SOURCE=<checkpoint> nnUNet_LLM_LAYER=1:3 nnUNetv2_train 4 3d_fullres 0 -tr nnUNetTrainerLLM_1epoch_2iters
    nnUNetv2_predict ... -tr nnUNetTrainerLLM_1epoch_2iters      # nnUNet_LLM_SOURCE unset, checkpoint deleted

and prints one row per family (exit codes, seconds, the layer label the plans record). Fold 0 validates on one case
(a ``splits_final.json`` written into the work folder's own preprocessed dataset, only where none exists) with one
export process (``nnUNet_def_n_proc=1`` unless set) to keep the run short: this checks wiring, not accuracy. Exit 1
when any family fails; logs under ``<work-dir>/logs``. Usage::

    python scripts/family_e2e.py --work-dir /tmp/family_e2e [--only llama gemma2 gguf:qwen2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
TRAINER = "nnUNetTrainerLLM_1epoch_2iters"
REFUSED_GGUF = {"bloom"}  # ALiBi: refused by design (tested in test_gguf)


def checkpoints(folder: Path, only: list[str] | None) -> dict[str, Path]:
    """``{name: checkpoint path}``: ``<model_type>`` folders (safetensors) and ``gguf:<arch>`` files."""
    sys.path.insert(0, str(TESTS))
    from gguf import GGMLQuantizationType
    from gguf_files import FAMILIES as GGUF_FAMILIES
    from gguf_files import tiny_model, write_gguf
    from test_families import FAMILIES, save_tiny

    names = [*sorted(FAMILIES), *(f"gguf:{k}" for k in sorted(GGUF_FAMILIES) if k not in REFUSED_GGUF)]
    out = {}
    for name in only or names:
        if name.startswith("gguf:"):
            family = GGUF_FAMILIES[name.removeprefix("gguf:")]
            path = folder / f"{name.removeprefix('gguf:')}.gguf"
            write_gguf(path, family, tiny_model(family), lambda _: GGMLQuantizationType.Q8_0)
        else:
            path = save_tiny(folder / name, name)
        out[name] = path
    return out


def one_validation_case(env: dict[str, str]) -> None:
    """Fold 0 of five with a single validation case, unless the dataset already has its splits."""
    from nnunetv2_llm.common.nnunet_commands import dataset_folder

    preprocessed = dataset_folder(env["nnUNet_preprocessed"], 4)
    splits = preprocessed / "splits_final.json"
    if splits.exists():
        return
    identifiers = sorted(p.name.removesuffix(".pkl") for p in preprocessed.glob("nnUNetPlans_3d_fullres/*.pkl"))
    folds = [{"train": identifiers[:i] + identifiers[i + 1:], "val": [identifiers[i]]} for i in range(5)]
    splits.write_text(json.dumps(folds, indent=1))


def run_family(name: str, source: Path, env: dict[str, str], image_folder: Path, logs: Path) -> dict:
    """Train with the checkpoint, delete it, predict without it; exit codes, seconds and the recorded layer."""
    from nnunetv2_llm.common.nnunet_commands import nnunet_command, trainer_folder
    from nnunetv2_llm.model.spec import BottleneckSpec

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("nnUNet_LLM_")}, **env,
           "nnUNet_results": env["nnUNet_results"] + f"/{name.replace(':', '_')}",
           "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", "1")}  # a validation pool costs ~40 s to start
    start = time.time()
    log = logs / f"{name.replace(':', '_')}"
    with open(f"{log}.train.log", "w") as f:
        command = [nnunet_command("nnUNetv2_train"), "4", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
        train = subprocess.run(command, env={**env, "nnUNet_LLM_SOURCE": str(source), "nnUNet_LLM_LAYER": "1:3"},
                               stdout=f, stderr=subprocess.STDOUT).returncode
    shutil.rmtree(source) if source.is_dir() else source.unlink()  # the predictor must not need it
    output = Path(f"{log}.prediction")
    with open(f"{log}.predict.log", "w") as f:
        predict = subprocess.run([nnunet_command("nnUNetv2_predict"), "-i", str(image_folder), "-o", str(output),
                                  "-d", "4", "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", "cpu",
                                  "-npp", "1", "-nps", "1", "--disable_progress_bar"],
                                 env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    folder = trainer_folder(env["nnUNet_results"], 4, TRAINER, "nnUNetPlans", "3d_fullres")
    spec = BottleneckSpec.from_model_folder(folder) if train == 0 else None
    written = len(list(output.glob("*.nii.gz")))
    return {"family": name, "train": train, "predict": predict, "predictions": written,
            "layers": spec.layer_label if spec else "-", "model_type": spec.model_type if spec else "-",
            "seconds": round(time.time() - start),
            "ok": train == 0 and predict == 0 and written == 1}


def main() -> int:
    from nnunetv2_llm.common.nnunet_commands import FIXTURE, demo_env, ensure_preprocessed, ensure_raw_from_msd

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("family_e2e"))
    parser.add_argument("--only", nargs="+", help="family names (model types, or gguf:<arch>); default: all tested")
    args = parser.parse_args()
    env = demo_env(args.work_dir)
    raw = ensure_raw_from_msd(FIXTURE, 4, env)
    ensure_preprocessed(4, "3d_fullres", env)
    one_validation_case(env)
    image_folder, logs = args.work_dir / "predict_in", args.work_dir / "logs"
    image_folder.mkdir(parents=True, exist_ok=True)
    logs.mkdir(exist_ok=True)
    first = sorted((raw / "imagesTr").glob("*.nii.gz"))[0]
    shutil.copy(first, image_folder / first.name)
    rows = []
    for name, source in checkpoints(args.work_dir / "checkpoints", args.only).items():
        rows.append(run_family(name, source, env, image_folder, logs))
        r = rows[-1]
        print(f"{r['family']:<22} {r['model_type']:<20} layers {r['layers']:<5} train {r['train']} "
              f"predict {r['predict']} predictions {r['predictions']} {r['seconds']:>4} s "
              f"{'ok' if r['ok'] else 'FAILED'}", flush=True)
    (args.work_dir / "summary.json").write_text(json.dumps(rows, indent=1))
    failed = [r["family"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} families trained and predicted"
          + (f"; failed: {', '.join(failed)} (logs: {logs})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
