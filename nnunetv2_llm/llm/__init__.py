"""Where the frozen layer comes from: the source (``source``), its config (``config``), the layer's classes
(``blueprint``), one reader per weights format (``readers``), the checked layer tensors (``layer``), and synthetic
checkpoints of real model shapes (``synthetic``)."""
