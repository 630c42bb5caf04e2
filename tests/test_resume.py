"""Kill ``nnUNetv2_train`` mid-epoch (SIGTERM, then SIGKILL) and resume with ``--c``: the real commands on the
embedded Hippocampus subset, with a tiny LLM source so that a run takes seconds.

One chain of three runs of ``nnUNetTrainerLLM_LoRA_3epochs_2iters`` (3 epochs of 2 iterations, LoRA adapters on
the frozen layer), built once for the module:
  run 1: SIGTERM to the trainer's process group (trainer + 2 augmentation workers, as scancel does) in epoch 1;
  run 2: ``--c``, SIGKILL to its process group during epoch 2;
  run 3: ``--c`` to the end (final validation included).
After each kill the checkpoint on disk is copied; the next run logs checksums of what it loaded, which must equal
the copy's: frozen layer (also equal to the source's layer), trainable weights (U-Net, projections, LoRA),
optimizer state.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reliability_helpers import (
    fold_dir,
    loaded_fingerprints,
    no_traceback,
    run_command,
    train,
    train_env,
)

from nnunetv2_llm.model.spec import FROZEN_PREFIX, BottleneckSpec, LLMChoice, frozen_layer_sha256, make_spec
from nnunetv2_llm.trainers.reliability.checkpoint_io import load_checkpoint_file
from nnunetv2_llm.trainers.reliability.fingerprints import state_fingerprints

TRAINER = "nnUNetTrainerLLM_LoRA_3epochs_2iters"


@pytest.fixture(scope="module")
def chain(workdir, tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    env = train_env(workdir, tmp / "results", tiny_llama, layer="1")
    folder = fold_dir(env, TRAINER)

    # run 1 with two augmentation worker processes, SIGTERM to the whole process group (what scancel does)
    first = train(TRAINER, {**env, "nnUNet_n_proc_DA": "2"}, kill_when=r": Epoch 1\s*$", sig=signal.SIGTERM,
                  whole_group=True, delay=0.3)
    time.sleep(1)
    first_group_alive = first.group_alive()
    temporaries_1 = sorted(p.name for p in folder.glob("*.tmp-*"))
    after_term = Path(shutil.copy(folder / "checkpoint_latest.pth", tmp / "after_sigterm.pth"))

    second = train(TRAINER, env, "--c", kill_when=r": Epoch 2\s*$", sig=signal.SIGKILL, whole_group=True, delay=0.3)
    readable_after_kill = {}
    for path in sorted(folder.glob("*.pth")):
        try:
            load_checkpoint_file(path)
            readable_after_kill[path.name] = True
        except Exception:
            readable_after_kill[path.name] = False
    after_kill = Path(shutil.copy(folder / "checkpoint_latest.pth", tmp / "after_sigkill.pth"))

    third = train(TRAINER, env, "--c")
    return SimpleNamespace(env=env, folder=folder, first=first, first_group_alive=first_group_alive, second=second,
                           third=third, after_term=after_term, after_kill=after_kill, temporaries_1=temporaries_1,
                           readable_after_kill=readable_after_kill, source=tiny_llama, tmp=tmp)


def test_sigterm_mid_epoch_ends_with_a_resume_hint(chain):
    run = chain.first
    assert run.killed and run.returncode == 128 + signal.SIGTERM, run.output[-2000:]
    assert "interrupted by SIGTERM during epoch 1" in run.output
    assert "checkpoint_latest.pth holds the state after epoch 0" in run.output
    assert "--c to continue from epoch 1" in run.output
    assert no_traceback(run.output)
    assert not chain.first_group_alive  # the augmentation workers were stopped, none left orphaned
    assert chain.temporaries_1 == []
    assert load_checkpoint_file(chain.after_term)["current_epoch"] == 1


def test_sigkill_mid_epoch_leaves_only_complete_checkpoints(chain):
    run = chain.second
    assert run.killed and run.returncode == -signal.SIGKILL, run.output[-2000:]
    assert chain.readable_after_kill and all(chain.readable_after_kill.values()), chain.readable_after_kill
    assert load_checkpoint_file(chain.after_kill)["current_epoch"] == 2


def test_resume_restores_the_saved_state_exactly(chain):
    spec = BottleneckSpec.from_plans(__import__("json").loads((chain.folder.parent / "plans.json").read_text()))
    for run, saved in ((chain.second, chain.after_term), (chain.third, chain.after_kill)):
        checkpoint = load_checkpoint_file(saved)
        expected = state_fingerprints(checkpoint["network_weights"], checkpoint["optimizer_state"],
                                      checkpoint["grad_scaler_state"], spec.dtype, FROZEN_PREFIX)
        logged = loaded_fingerprints(run.output)
        assert logged["file"] == "checkpoint_latest.pth"
        assert logged["epoch"] == str(checkpoint["current_epoch"])
        for key, value in expected.items():
            assert logged[key] == value, key
        # The optimizer holds exactly the trainable tensors, and SGD momentum for the projections and LoRA
        # adapters. Parameter i of the optimizer is the i-th distinct trainable tensor of the state dict (it names
        # some tensors twice, e.g. decoder.encoder.* and all_modules.*).
        weights, names, seen = checkpoint["network_weights"], [], set()
        for key, value in weights.items():
            if (not key.startswith(FROZEN_PREFIX) or "lora_" in key) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                names.append(key)
        optimizer = checkpoint["optimizer_state"]
        assert optimizer["param_groups"][0]["params"] == list(range(len(names)))
        with_momentum = {names[i] for i, state in optimizer["state"].items() if "momentum_buffer" in state}
        block = {n for n in names if n.startswith("bottleneck.")}
        assert any("lora_" in n for n in block) and block <= with_momentum


def test_frozen_layer_stays_bit_identical_to_the_source(chain):
    source_sha = make_spec(LLMChoice("pretrained", source=str(chain.source), layer=1)).layer_sha256
    spec = BottleneckSpec.from_plans(__import__("json").loads((chain.folder.parent / "plans.json").read_text()))
    assert spec.layer_sha256 == source_sha
    final = load_checkpoint_file(chain.folder / "checkpoint_final.pth")
    for checkpoint in (load_checkpoint_file(chain.after_term), load_checkpoint_file(chain.after_kill), final):
        assert frozen_layer_sha256(checkpoint["network_weights"], spec.dtype) == source_sha
    assert loaded_fingerprints(chain.third.output)["frozen_layer"] == source_sha
    # ... while the trainable parts did train between the kills
    first, last = load_checkpoint_file(chain.after_term)["network_weights"], final["network_weights"]
    for key in ("bottleneck.proj_in.down.weight",
                "bottleneck.mixer.layer.self_attn.q_proj.lora_A.default.weight"):
        assert not torch.equal(first[key], last[key]), key


def test_epoch_counter_continues(chain):
    assert ": Epoch 0" in chain.first.output
    assert ": Epoch 1" in chain.second.output and ": Epoch 0" not in chain.second.output
    assert ": Epoch 2" in chain.third.output
    assert ": Epoch 0" not in chain.third.output and ": Epoch 1" not in chain.third.output
    assert chain.third.returncode == 0, chain.third.output[-3000:]
    final = load_checkpoint_file(chain.folder / "checkpoint_final.pth")
    assert final["current_epoch"] == 3
    losses = final["logging"]["train_losses"]
    assert len(losses) == 3 and np.isfinite(np.asarray(losses, dtype=float)).all()
    assert not (chain.folder / "checkpoint_latest.pth").exists()  # nnU-Net removes it once final is written
    assert (chain.folder / "validation" / "summary.json").is_file()


def test_predict_guard_on_the_resumed_model(chain):
    """``nnunetv2_llm predict`` runs nnUNetv2_predict, then refuses to overwrite its predictions silently."""
    raw = Path(chain.env["nnUNet_raw"]) / "Dataset004_Hippocampus" / "imagesTs"
    out = chain.tmp / "predictions"
    args = ["nnunetv2_llm", "predict", "-i", str(raw), "-o", str(out), "-d", "4", "-c", "3d_fullres", "-f", "0",
            "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"]
    first = run_command(args, chain.env)
    assert first.returncode == 0, first.output[-3000:]
    predictions = sorted(out.glob("*.nii.gz"))
    assert len(predictions) == len(list(raw.glob("*_0000.nii.gz"))) >= 1
    stamp = predictions[0].stat().st_mtime_ns

    again = run_command(args, chain.env)
    assert again.returncode == 2 and no_traceback(again.output)
    assert "already holds" in again.output and "--overwrite" in again.output
    assert predictions[0].stat().st_mtime_ns == stamp

    resumed = run_command([*args, "--continue_prediction"], chain.env)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert predictions[0].stat().st_mtime_ns == stamp  # nnU-Net skipped the finished case


SLOW_SAVE_CHILD = r'''
import io, sys, time
import torch
from nnunetv2_llm.trainers.reliability import checkpoint_io

mode, target = sys.argv[1], sys.argv[2]
real_save = torch.save


def slow_save(obj, f, *args, **kwargs):
    """torch.save, with the bytes trickling out so that a kill lands in the middle of the write."""
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    out = open(f, "wb") if isinstance(f, str) else f
    for start in range(0, len(data), 1 << 16):
        out.write(data[start:start + (1 << 16)])
        out.flush()
        if start == 1 << 17:
            print("writing", flush=True)
        time.sleep(0.01)


torch.save = slow_save
checkpoint = {"version": 2, "network_weights": {"w": torch.randn(2_000_000)}}
if mode == "atomic":
    checkpoint_io.atomic_torch_save(checkpoint, target)
else:  # what nnU-Net's save_checkpoint does: torch.save straight onto the final name
    torch.save(checkpoint, target)
print("done", flush=True)
'''


def test_a_temporary_being_written_by_a_running_process_is_kept(tmp_path):
    """Folds started in parallel share the model folder: one fold's start must not delete another's live write."""
    import subprocess
    import sys

    from nnunetv2_llm.common.atomic_files import TMP_MARKER, remove_stale_temporaries

    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"plans.json{TMP_MARKER}{writer.pid}"
        live.write_text("{}")
        assert remove_stale_temporaries(tmp_path) == [] and live.is_file()
    finally:
        writer.kill()
        writer.wait(timeout=60)
    assert remove_stale_temporaries(tmp_path) == [live.name] and not live.exists()


@pytest.mark.parametrize("mode", ["atomic", "nnunet"])
def test_kill_during_checkpoint_write(tmp_path, mode):
    """SIGKILL in the middle of writing a checkpoint: the atomic write leaves the previous checkpoint intact (and a
    temporary that the next training start removes); nnU-Net's direct torch.save leaves a truncated file that
    torch.load (and so --c) fails on."""
    import subprocess
    import sys

    from nnunetv2_llm.common.atomic_files import remove_stale_temporaries
    from nnunetv2_llm.trainers.reliability.checkpoint_io import atomic_torch_save

    target = tmp_path / "checkpoint_latest.pth"
    atomic_torch_save({"version": 1, "network_weights": {"w": torch.zeros(3)}}, target)
    script = tmp_path / "child.py"
    script.write_text(SLOW_SAVE_CHILD)
    child = subprocess.Popen([sys.executable, str(script), mode, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        child.kill()
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    if mode == "atomic":
        assert load_checkpoint_file(target)["version"] == 1  # the previous checkpoint, complete
        assert remove_stale_temporaries(tmp_path) and not list(tmp_path.glob("*.tmp-*"))
    else:
        with pytest.raises(RuntimeError, match="PytorchStreamReader"):  # a truncated zip archive
            torch.load(target, weights_only=False)
