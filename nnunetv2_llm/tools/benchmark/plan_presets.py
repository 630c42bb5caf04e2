"""Plans for datasets that are not on this machine: nnU-Net's own ``ExperimentPlanner`` run on a described dataset
(channels, labels, case count, spacing and median shape), so the benchmark can time the block on the plan sizes
nnU-Net picks for large images without the images. Batches of the planned shape are then synthetic.

The planner reads a dataset.json and a fingerprint from ``nnUNet_raw`` and ``nnUNet_preprocessed``; both are written
to a temporary folder, and the only method replaced is ``determine_reader_writer`` (it opens an example image).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetDescription:
    """What the planner needs to know about a dataset: the fingerprint's spacings and cropped shapes, here one
    median case repeated ``cases`` times (spacing and shape in the image's axis order, z first)."""

    name: str
    configuration: str
    channels: dict[str, str]
    labels: dict[str, int | list[int]]
    cases: int
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    regions_class_order: tuple[int, ...] | None = None
    note: str = ""


PRESETS = {
    "hippocampus": DatasetDescription(
        "Dataset904_SyntheticHippocampus", "3d_fullres", {"0": "MRI"}, {"background": 0, "Anterior": 1, "Posterior": 2},
        260, (1.0, 1.0, 1.0), (36, 50, 35), note="MSD Task04 sized: 260 cases, median 36x50x35 at 1 mm"),
    "brats_3d": DatasetDescription(
        "Dataset937_SyntheticBraTS", "3d_fullres", {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"},
        # the region labels of nnU-Net's own BraTS 2021 conversion (Dataset137_BraTS21.py)
        {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
        1251, (1.0, 1.0, 1.0), (140, 171, 137), regions_class_order=(1, 2, 3),
        note="BraTS 2021 sized: 1,251 cases of 4 MRI channels, median 140x171x137 at 1 mm after cropping"),
    "large_2d": DatasetDescription(
        "Dataset938_SyntheticLarge2D", "2d", {"0": "MRI"}, {"background": 0, "foreground": 1},
        1000, (999.0, 1.0, 1.0), (1, 512, 512), note="a 2D dataset of 1,000 512x512 images"),
}


def preset_names() -> list[str]:
    """The names ``--plan-preset`` accepts."""
    return sorted(PRESETS)


def dataset_json(description: DatasetDescription) -> dict:
    """The dataset.json nnU-Net's conversion scripts would write for the described dataset."""
    result = {"channel_names": description.channels, "labels": description.labels, "numTraining": description.cases,
              "file_ending": ".nii.gz"}
    if description.regions_class_order:
        result["regions_class_order"] = list(description.regions_class_order)
    return result


def fingerprint(description: DatasetDescription) -> dict:
    """A fingerprint of ``cases`` identical median cases; intensities are placeholders (they only steer
    preprocessing, which synthetic batches skip)."""
    intensities = {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
                   "percentile_99_5": 1.0, "std": 1.0}
    return {"spacings": [list(description.spacing)] * description.cases,
            "shapes_after_crop": [list(description.shape)] * description.cases,
            "median_relative_size_after_cropping": 1.0,
            "foreground_intensity_properties_per_channel": {c: intensities for c in description.channels}}


def plan_preset(name: str) -> tuple[dict, dict, DatasetDescription]:
    """Plans from nnU-Net's ``ExperimentPlanner`` (default GPU memory target) for preset ``name``.

    Returns:
        (plans, dataset_json, description): plans as nnUNetv2_plan_and_preprocess would write them.

    Raises:
        LLMSettingError: an unknown preset name.
    """
    from unittest import mock

    from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner as planner_module
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunetv2_llm.common.errors import LLMSettingError

    if name not in PRESETS:
        raise LLMSettingError(f"unknown plan preset {name!r}; choose one of {', '.join(preset_names())}",
                              "--plan-preset")
    description = PRESETS[name]

    class DescribedDatasetPlanner(planner_module.ExperimentPlanner):
        def determine_reader_writer(self):  # the described dataset has no image to open
            return SimpleITKIO

    with tempfile.TemporaryDirectory(prefix="nnunetv2_llm_plan_") as tmp:
        raw, preprocessed = Path(tmp, "raw", description.name), Path(tmp, "preprocessed", description.name)
        (raw / "imagesTr").mkdir(parents=True)
        preprocessed.mkdir(parents=True)
        (raw / "dataset.json").write_text(json.dumps(dataset_json(description)))
        (preprocessed / "dataset_fingerprint.json").write_text(json.dumps(fingerprint(description)))
        # the planner sizes its estimation threads by nnUNet_n_proc_DA, which the benchmark sets to 0 (no workers)
        with mock.patch.object(planner_module, "nnUNet_raw", str(raw.parent)), \
                mock.patch.object(planner_module, "nnUNet_preprocessed", str(preprocessed.parent)), \
                mock.patch.dict(os.environ, {"nnUNet_n_proc_DA": str(os.cpu_count() or 1)}), \
                contextlib.redirect_stdout(io.StringIO()):
            plans = DescribedDatasetPlanner(description.name).plan_experiment()
    return json.loads(json.dumps(plans)), dataset_json(description), description
