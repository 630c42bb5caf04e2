"""Head-to-head comparison of nnU-Net v2 trainers on their cross-validation predictions.

Compute is separate from rendering:

* ``checks``: what a comparison refuses before it computes anything (trainers, folds, tolerances, the output
  folder).
* ``discover``: trainer folders, validation predictions, the expected cases from ``splits_final.json``, pairing.
* ``cases``: reading segmentations with nnU-Net's reader and the per-case metrics table.
* ``curves``: training curves from a fold's checkpoint or logs.
* ``tables``: paired differences, means and paired tests (numbers only).
* ``report``: the markdown report; ``figures``: the plots.
* ``run``: ``compare`` and ``write_comparison``, which tie them together; ``cli``: ``nnunetv2_llm compare``.
"""
