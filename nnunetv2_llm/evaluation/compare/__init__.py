"""Head-to-head comparison of nnU-Net v2 trainers (and their seed variants) on their cross-validation predictions
of one or more datasets.

Compute is separate from rendering:

* ``checks``: what a comparison refuses before it computes anything (trainers, folds, tolerances, the output
  folder).
* ``discover``: trainer folders, validation predictions, the expected cases from ``splits_final.json``, pairing.
* ``cases``: reading segmentations with nnU-Net's reader and the per-case metrics table.
* ``curves``: training curves from a fold's checkpoint or logs; ``compute``: its training hours and device.
* ``tables``: seed means per case, paired differences, means, paired tests and the seed spread (numbers only);
  ``evaluation.ranking``: the rankings across datasets.
* ``report`` (per dataset) and ``report_runs`` (rankings, seed spread, compute): the markdown report;
  ``figures``: the plots.
* ``run``: ``compare`` and ``write_comparison``, which tie them together; ``cli``: ``nnunetv2_llm compare``.
"""
