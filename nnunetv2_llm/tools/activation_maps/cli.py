"""``nnunetv2_llm activation-maps``: the bottleneck features before and after the LLM block, on an input slice.

The model is loaded by nnU-Net itself (``nnUNetPredictor.initialize_from_trained_model_folder``: the trainer's
``build_network_architecture`` and the checkpoint's weights) and the case is preprocessed by the model's own
preprocessor (transpose, crop to non-zero, resample, normalise), so the network sees exactly what
``nnUNetv2_predict`` feeds it. One patch (the configuration's patch size, centred on the chosen slice; or the
whole image with ``--region whole``) goes through the network once; forward hooks on the bottleneck block
capture its input x and output y = x + delta, shape (C, *bottleneck). Each is reduced over channels per voxel
(mean |a| or L2 norm), upsampled to the patch and overlaid on the slice: input / before / after / change
(the reduction of y - x). Everything is shown in the network's input space (after nnU-Net's preprocessing).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from nnunetv2_llm.tools.activation_maps.compute import REDUCTIONS, REGIONS, compute_activation_maps
from nnunetv2_llm.tools.activation_maps.figure import check_output, plot_activation_maps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags."""
    parser.add_argument("-m", "--model-folder", required=True,
                        help="trainer folder with plans.json, dataset.json and fold_X/ "
                             "(nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION)")
    parser.add_argument("-f", "--fold", default="0", help="fold to load (default 0; 'all' for fold_all)")
    parser.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("-i", "--input", nargs="+", required=True,
                        help="the case's image file(s) in channel order; CASE_0000.nii.gz alone finds its "
                             "other channels")
    parser.add_argument("-o", "--output", required=True, help="figure to write (.png, .pdf, .svg)")
    parser.add_argument("--slice-axis", type=int, default=0,
                        help="axis of the image array as nnU-Net reads it (SimpleITK: 0 = z); default 0")
    parser.add_argument("--slice", type=int, default=None,
                        help="slice index along --slice-axis in the input image (default: the middle)")
    parser.add_argument("--region", choices=REGIONS, default="patch",
                        help="'patch': one patch of the training patch size centred on the slice, as the network "
                             "saw in training (default); 'whole': the whole preprocessed image")
    parser.add_argument("--reduce", choices=REDUCTIONS, default="mean-abs",
                        help="per-voxel reduction over channels (default mean-abs)")
    parser.add_argument("--upsample", choices=("trilinear", "nearest"), default="trilinear",
                        help="'nearest' shows the true bottleneck resolution (default trilinear; bilinear in 2d)")
    parser.add_argument("--channel", type=int, default=0, help="input channel shown under the maps (default 0)")
    parser.add_argument("--save-arrays", help="also write the captured tensors and maps to this .npz")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))


def main(args: argparse.Namespace) -> int:
    """Check the output paths, capture the activations, write the figure (and the arrays)."""
    check_output(args.output, "-o", figure=True)
    if args.save_arrays:
        check_output(args.save_arrays, "--save-arrays")
    result = compute_activation_maps(args.model_folder, args.input, fold=args.fold, checkpoint=args.checkpoint,
                                     device=args.device, slice_axis=args.slice_axis, slice_index=args.slice,
                                     region=args.region, reduction=args.reduce, upsample=args.upsample,
                                     channel=args.channel)
    out = plot_activation_maps(result, args.output)
    if args.save_arrays:
        np.savez_compressed(args.save_arrays, before=result.before, after=result.after,
                            image_slice=result.image_slice, segmentation_slice=result.segmentation_slice,
                            **{f"map_{k}": v for k, v in result.maps.items()},
                            meta=json.dumps(result.meta))
        print(f"arrays: {args.save_arrays}")
    print(f"wrote {out}")
    print(f"  bottleneck {result.before.shape[0]} channels x {result.meta['bottleneck_shape']}; "
          f"||after - before|| / ||before|| = {result.relative_change:.4g}")
    return 0
