"""Resume details against nnU-Net's own epoch loop: the best-EMA value a latest checkpoint stores, an earlier run's
checkpoint_final.pth on a fresh start, recovery advice for unreadable checkpoints, -pretrained_weights that would
replace the frozen LLM layer, and an unreadable or malformed plans.json in the model folder."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from nnunetv2.training.logging.nnunet_logger import MetaLogger
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from reliability_helpers import make_trainer

from nnunetv2_llm.trainers.reliability import ReliabilityMixin


class _Stub(ReliabilityMixin, nnUNetTrainer):
    """What nnU-Net's ``on_epoch_end`` and the checkpoint code touch, without a dataset."""

    def __init__(self, folder: str):
        self.logger, self.output_folder, self.local_rank = MetaLogger(folder, False), folder, 1  # rank 1: no plot
        self.save_every, self.num_epochs, self.current_epoch, self._best_ema = 1, 10, 0, None
        self.network = torch.nn.Linear(1, 1)
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=0.1)
        self.grad_scaler, self.my_init_kwargs, self.inference_allowed_mirroring_axes = None, {}, None
        self.device, self.saved, self.logged = torch.device("cpu"), {}, []

    def print_to_log_file(self, *args, **kwargs) -> None:
        self.logged.append(" ".join(map(str, args)))

    def save_checkpoint(self, filename: str) -> None:
        self.saved[os.path.basename(filename)] = copy.deepcopy(self._checkpoint_dict())

    def epoch(self, dice: float) -> None:
        e = self.current_epoch
        for key, value in (("epoch_start_timestamps", 0.0), ("train_losses", 0.0), ("val_losses", 0.0),
                           ("lrs", 0.01), ("mean_fg_dice", dice), ("dice_per_class_or_region", [dice])):
            self.logger.log(key, value, e)
        self.on_epoch_end()


def test_a_resumed_run_does_not_overwrite_a_better_best_checkpoint(tmp_path):
    """Pseudo Dice 0.5, 1.0, 0.3 gives EMA 0.5, 0.55 (new best), 0.525: epoch 2 is not a new best, resumed or not."""
    first = _Stub(str(tmp_path))
    first.epoch(0.5)
    first.epoch(1.0)
    latest = first.saved["checkpoint_latest.pth"]
    assert latest["_best_ema"] == pytest.approx(0.55)  # includes epoch 1, whose best update comes after the save
    resumed = _Stub(str(tmp_path))
    resumed._apply_checkpoint(latest, latest["network_weights"])
    resumed.epoch(0.3)
    assert "checkpoint_best.pth" not in resumed.saved and resumed._best_ema == pytest.approx(0.55)


def test_a_fresh_start_sets_an_earlier_final_checkpoint_aside(tmp_path):
    final = tmp_path / "checkpoint_final.pth"
    final.write_bytes(b"an earlier run")
    trainer = _Stub(str(tmp_path))
    trainer.current_epoch = 3  # a resume: nothing is touched
    trainer._set_aside_earlier_final_checkpoint()
    assert final.is_file()
    trainer.current_epoch = 0
    trainer._set_aside_earlier_final_checkpoint()
    kept = list(tmp_path.glob("checkpoint_final.pth.previous-*"))
    assert not final.exists() and len(kept) == 1 and kept[0].read_bytes() == b"an earlier run"
    assert "kept as checkpoint_final.pth.previous-" in trainer.logged[-1]


def test_an_unreadable_best_checkpoint_beside_a_final_one_points_to_val(tmp_path, capsys):
    (tmp_path / "checkpoint_best.pth").write_bytes(b"truncated")
    (tmp_path / "checkpoint_final.pth").write_bytes(b"also here")
    trainer = _Stub(str(tmp_path))
    trainer.local_rank = 0
    with pytest.raises(SystemExit) as exit_info:
        trainer._read_checkpoint_with_fallback(str(tmp_path / "checkpoint_best.pth"))
    assert exit_info.value.code == 2
    assert "validate it with --val without --val_best" in capsys.readouterr().err


def test_pretrained_weights_replacing_the_frozen_layer_stop_training(workdir, tmp_path, monkeypatch, tiny_llama,
                                                                      capsys):
    trainer = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, tmp_path / "results", monkeypatch, tiny_llama)
    trainer.initialize()
    with torch.no_grad():  # as nnU-Net's load_pretrained_weights would copy another layer of the same shape
        trainer.network.bottleneck.mixer.layer.mlp.up_proj.weight.add_(1.0)
    with pytest.raises(SystemExit) as exit_info:
        trainer.on_train_start()
    assert exit_info.value.code == 2
    assert "replaced after the network was built" in capsys.readouterr().err


def test_a_truncated_plans_json_is_a_warning_and_a_malformed_block_an_error(workdir, tmp_path, monkeypatch,
                                                                             tiny_llama, capsys):
    """The model folder's plans.json is read before training: a truncated file (nnU-Net rewrites it when training
    starts) is only logged; a block that is not a spec stops with exit code 2."""
    results = tmp_path / "results"
    first = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, results, monkeypatch, tiny_llama)
    plans = Path(first.output_folder_base) / "plans.json"
    plans.parent.mkdir(parents=True, exist_ok=True)
    plans.write_text('{"nnunetv2_llm": {"mixer": "pre')
    second = make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, results, monkeypatch, tiny_llama)
    log = Path(second.log_file).read_text()
    assert f"WARNING: {plans} is unreadable (" in log and "it is rewritten when training starts" in log

    plans.write_text(json.dumps({"nnunetv2_llm": {"mixer": "pretrained"}}))
    with pytest.raises(SystemExit) as exit_info:
        make_trainer("nnUNetTrainerLLM_1epoch_2iters", workdir, results, monkeypatch, tiny_llama)
    assert exit_info.value.code == 2 and "nnunetv2_llm block is malformed" in capsys.readouterr().err


def test_a_worker_told_to_stop_after_sigterm_exits_cleanly():
    """Forked augmentation workers inherit the SIGTERM handler: a signalled worker that is then stopped by the
    trainer exits normally, not held up (and finally SIGKILLed) by the handler's grace-period timer."""
    import multiprocessing
    import signal
    import time

    class Trainer(ReliabilityMixin):
        def __init__(self):  # only the signal handling
            self._previous_sigterm = None

    trainer = Trainer()
    trainer._install_sigterm_handler()
    try:
        context = multiprocessing.get_context("fork")
        stop = context.Event()
        worker = context.Process(target=_wait_for, args=(stop,), daemon=True)
        worker.start()
        time.sleep(0.5)
        os.kill(worker.pid, signal.SIGTERM)
        time.sleep(0.1)
        stop.set()
        worker.join(timeout=30)
    finally:
        trainer._restore_sigterm_handler()
    assert worker.exitcode == 0


def _wait_for(stop) -> None:
    while not stop.is_set():
        stop.wait(0.05)
