"""Segmentation metrics in physical units, one per module, as MONAI keeps them: ``dice``, ``surface_dice``
(NSD) and ``hausdorff`` (HD95), each computed by MONAI; ``per_case`` applies them to a case's labels with the
project's conventions for empty masks and single-slice volumes."""
