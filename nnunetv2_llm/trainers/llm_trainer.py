"""nnUNetTrainerLLM: nnU-Net's trainer with the LLM bottleneck block in the planned network (its controls and
other variants: ``nnunetv2_llm.trainers.variants``)."""

from __future__ import annotations

import os

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunetv2_llm.common.errors import LLMSettingError, exit_on_setting_error
from nnunetv2_llm.model.network import build_llm_unet, reuse_layer, unwrap_network
from nnunetv2_llm.model.spec import (
    FROZEN_PREFIX,
    PLANS_FILE,
    BottleneckSpec,
    LLMChoice,
    PlansUnreadable,
    frozen_layer_differs,
    frozen_layer_sha256,
    make_spec_and_layer,
)
from nnunetv2_llm.trainers.reliability import ReliabilityMixin
from nnunetv2_llm.trainers.reliability.exits import raise_setting_error
from nnunetv2_llm.trainers.schedule import GroupPolyLRScheduler


class nnUNetTrainerLLM(ReliabilityMixin, nnUNetTrainer):
    """A frozen pre-trained LLM layer (``$nnUNet_LLM_SOURCE``, layer ``$nnUNet_LLM_LAYER``; default: the
    last layer of the embedded SmolLM2-135M) at the bottleneck of nnU-Net's planned network.

    Reliability (atomic checkpoints every epoch, checked resume, NaN guard, SIGTERM, ``nnUNet_LLM_SEED``):
    see ``nnunetv2_llm.trainers.reliability``. The class attributes below are what its variants change."""

    llm_mixer = "pretrained"
    llm_rank = 64  # 0: full-rank nn.Linear projections
    llm_lora_rank = 0
    llm_dtype: str | None = None  # None: the dtype the source stores the layer in (GGUF: float32)
    llm_train_layer = False  # True: the LLM layer trains too, at llm_layer_lr_scale x nnU-Net's learning rate
    llm_layer_lr_scale = 1.0
    frozen_prefix = FROZEN_PREFIX

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        with exit_on_setting_error():
            spec, layer_read = make_spec_and_layer(LLMChoice(
                self.llm_mixer, rank=self.llm_rank, lora_rank=self.llm_lora_rank, dtype=self.llm_dtype,
                seed=type(self).llm_seed or 0, train_layer=self.llm_train_layer))
            self._check_model_folder(spec)
        self.llm_spec = spec
        self._layer_read = layer_read  # handed to the network build in initialize(), then dropped
        spec.to_plans(self.plans_manager.plans)
        self.print_to_log_file(
            f"nnunetv2_llm: mixer={spec.mixer} source={spec.source} layer={spec.layer_label} "
            f"({spec.model_type}, width {spec.width}, {spec.dtype}) rank={spec.rank} lora_rank={spec.lora_rank} "
            f"train_layer={spec.train_layer} "
            f"layer_sha256={spec.layer_sha256 or '-'}",
            also_print_to_console=True)

    def initialize(self) -> None:
        """nnU-Net's initialize; the network takes the frozen layer read in ``__init__`` (one read per process)."""
        with reuse_layer(self.llm_spec, self._layer_read):
            super().initialize()
        self._layer_read = None
        # a pre-trained layer's build took the very tensors whose checksum make_spec_and_layer computed (reuse_layer)
        self._built_layer_sha256 = self.llm_spec.layer_sha256 or self._frozen_layer_sha256()

    def _frozen_layer_sha256(self) -> str | None:
        if self.llm_spec.mixer == "identity":
            return None
        return frozen_layer_sha256(unwrap_network(self.network).state_dict(), self.llm_spec.dtype, self.frozen_prefix)

    def on_train_start(self) -> None:
        """nnU-Net's ``-pretrained_weights`` copies every tensor whose name and shape match, the frozen layer's too:
        a run would then train on another layer than configured (or a random control on a pre-trained one)."""
        if not self.was_initialized:
            self.initialize()
        network_state = unwrap_network(self.network).state_dict()
        if frozen_layer_differs(network_state, self.llm_spec, self._built_layer_sha256, self.frozen_prefix):
            raise_setting_error(
                f"the frozen LLM layer was replaced after the network was built (by -pretrained_weights?), so this run "
                f"would not train with layer {self.llm_spec.layer} of {self.llm_spec.source} ({self.llm_spec.mixer}). "
                "Start from weights of a run with the same LLM settings, or without -pretrained_weights",
                "-pretrained_weights")
        super().on_train_start()

    def _check_model_folder(self, spec: BottleneckSpec) -> None:
        """Refuse to mix LLM choices in one model folder (other folds, or a `--c` resume)."""
        if not self.output_folder_base or not os.path.isfile(os.path.join(self.output_folder_base, PLANS_FILE)):
            return
        try:
            saved_spec = BottleneckSpec.from_model_folder(self.output_folder_base, required=False)
        except PlansUnreadable as e:  # a truncated plans.json: nnU-Net rewrites it when training starts
            self.print_to_log_file(f"nnunetv2_llm: WARNING: {e.path} is unreadable ({e.reason}); it is rewritten when "
                                   "training starts, and a resumed checkpoint is still checked against the LLM layer")
            return
        if saved_spec is None:
            return
        differences = saved_spec.differences(spec)
        if differences:
            hidden = [d for d in differences if d.startswith("hidden_size:")]
            what = (f"an LLM of hidden size {saved_spec.width}, the configured one has {spec.width}" if hidden
                    else "another LLM setting")
            raise LLMSettingError(
                f"the model folder {self.output_folder_base} was trained with {what} (saved: source "
                f"{saved_spec.source}, layer {saved_spec.layer}; saved vs configured: {'; '.join(differences[:4])}). "
                "Set the same source and layer, or use a new results folder",
                "nnUNet_LLM_SOURCE / nnUNet_LLM_LAYER",
            )

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager,
                                   configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        unet = get_network_from_plans(
            configuration_manager.network_arch_class_name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels,
            num_output_channels,
            allow_init=True,
            deep_supervision=enable_deep_supervision)
        # Training takes the layer read in __init__ (reuse_layer); everywhere else nnU-Net loads the checkpoint's
        # network_weights next (the predictor), so the LLM source is not read again.
        with exit_on_setting_error():
            return build_llm_unet(BottleneckSpec.from_plans(plans_manager.plans), unet, from_checkpoint=True)

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, PolyLRScheduler]:
        """nnU-Net's SGD + poly schedule over the trainable parameters only (the frozen layer is left out); a layer
        that trains (``llm_train_layer``) gets its own parameter group at ``llm_layer_lr_scale`` x the rate."""
        layer = {id(p) for name, p in self.network.named_parameters()
                 if p.requires_grad and self.frozen_prefix in name and "lora_" not in name}
        rest = [p for p in self.network.parameters() if p.requires_grad and id(p) not in layer]
        groups = [{"params": rest, "lr_scale": 1.0}]
        if layer:
            groups.append({"params": [p for p in self.network.parameters() if id(p) in layer],
                           "lr_scale": self.llm_layer_lr_scale})
        optimizer = torch.optim.SGD(groups, self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, GroupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
