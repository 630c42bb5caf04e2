"""Frozen parameters under torch DDP, as nnU-Net's ``-num_gpus N`` wraps the network: two CPU processes with the
gloo backend (nnU-Net itself uses NCCL on GPUs; its multi-GPU path needs CUDA and is not run here).

Checked: DDP registers only the trainable tensors (no gradient buckets for the frozen layer), training steps
all-reduce the projections' and LoRA adapters' gradients so both ranks stay identical, the frozen layer keeps
its checksum and gets no gradient, SyncBatchNorm conversion (nnU-Net does it) is harmless, and the trainers' own
``ReliabilityMixin.train_step`` takes a collective skip decision (one rank's NaN input makes every rank skip the
update) that keeps the ranks in step without a hang.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import asdict

import pytest
import torch
from torch import nn

from nnunetv2_llm.trainers.reliability import ReliabilityMixin

TIMEOUT_S = 240


def tiny_unet() -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(input_channels=1, n_stages=3, features_per_stage=(8, 16, 32), conv_op=nn.Conv3d,
                         kernel_sizes=3, strides=(1, 2, 2), num_classes=3, n_conv_per_stage=2,
                         n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


class _Stepper(ReliabilityMixin):
    """The least a trainer holds for ``ReliabilityMixin.train_step`` (CPU, no gradient scaler)."""

    def __init__(self, network: nn.Module, optimizer: torch.optim.Optimizer):
        self.network, self.optimizer, self.grad_scaler = network, optimizer, None
        self.device, self.current_epoch, self.max_nonfinite_steps = torch.device("cpu"), 0, 3
        self._iteration = self._nonfinite_in_a_row = self._nonfinite_total = 0
        self.logged: list[str] = []

    @staticmethod
    def loss(output: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return sum(o.float().square().mean() for o in output)

    def print_to_log_file(self, *args) -> None:
        self.logged.append(" ".join(map(str, args)))

    def diagnose_nonfinite(self, data: torch.Tensor, target: torch.Tensor) -> str:
        return "test input"


def _worker(rank: int, world: int, port: int, spec_json: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nnunetv2_llm.model.network import build_llm_unet
    from nnunetv2_llm.model.spec import BottleneckSpec, frozen_layer_sha256
    from nnunetv2_llm.trainers.reliability.fingerprints import tree_sha256

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        spec = BottleneckSpec(**json.loads(spec_json))
        torch.manual_seed(rank)  # different initialisations: DDP must broadcast rank 0's
        net = build_llm_unet(spec, tiny_unet())
        nn.init.normal_(net.bottleneck.proj_out.up.weight, std=0.1)
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        ddp = DDP(net)
        trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
        frozen = {n: p for n, p in net.named_parameters() if not p.requires_grad}
        registered = ddp._get_ddp_logging_data().get("num_parameter_tensors")
        optimizer = torch.optim.SGD(trainable.values(), lr=1e-2, momentum=0.99, nesterov=True)
        start = tree_sha256({n: p for n, p in net.state_dict().items()})
        stepper = _Stepper(ddp, optimizer)
        skipped, losses = [], []
        for step in range(4):
            generator = torch.Generator().manual_seed(100 * rank + step)
            x = torch.randn(2, 1, 16, 16, 16, generator=generator)
            if step == 1 and rank == 0:
                x[0, 0, 0, 0, 0] = float("nan")  # only rank 0 sees a NaN input
            before = tree_sha256({n: p for n, p in trainable.items()})
            loss = float(stepper.train_step({"data": x, "target": torch.zeros(1)})["loss"])
            if tree_sha256({n: p for n, p in trainable.items()}) == before:
                skipped.append(step)
            else:
                losses.append(loss)
        result = {
            "registered": registered, "n_trainable": len(trainable), "n_frozen": len(frozen),
            "frozen_sha": frozen_layer_sha256(net.state_dict(), spec.dtype),
            "frozen_grads": [n for n, p in frozen.items() if p.grad is not None],
            "trainable_sha": tree_sha256({n: p for n, p in trainable.items()}),
            "changed": tree_sha256({n: p for n, p in net.state_dict().items()}) != start,
            "lora": sorted(n for n in trainable if "lora_" in n)[:2], "skipped": skipped, "losses": losses,
            "logged": stepper.logged,
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_frozen_layer_under_ddp_gloo(tiny_llama, tmp_path):
    import torch.multiprocessing as mp

    from nnunetv2_llm.model.spec import LLMChoice, make_spec

    spec = make_spec(LLMChoice("pretrained", source=str(tiny_llama), layer=1, rank=4, lora_rank=2))
    context = mp.start_processes(_worker, args=(2, free_port(), json.dumps(asdict(spec)), str(tmp_path)),
                                 nprocs=2, join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s (a hang in a collective?)")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["registered"] == result["n_trainable"]  # no bucket holds a frozen tensor
        assert result["n_frozen"] > 0 and result["frozen_grads"] == []
        assert result["frozen_sha"] == spec.layer_sha256  # bit-identical to the source after training steps
        assert result["lora"] and result["changed"]
        assert result["skipped"] == [1] and len(result["losses"]) == 3  # both ranks skipped rank 0's NaN step
        assert all(map(math.isfinite, result["losses"]))
        assert len(result["logged"]) == 1 and "optimizer step skipped" in result["logged"][0]
    assert results[0]["trainable_sha"] == results[1]["trainable_sha"]  # gradients were all-reduced
