"""Entry point for nnU-Net's trainer lookup from a source checkout: ``export nnUNet_extTrainer=<repo>/trainers``.

``nnunetv2_llm info --exports`` points at the same module inside the package (``nnunetv2_llm/trainers/lookup``),
which an installed wheel has too. nnU-Net imports the modules of this folder by bare name, so the classes live in
the installed package.
"""

from nnunetv2_llm.trainers import *  # noqa: F401,F403
from nnunetv2_llm.trainers import __getattr__  # noqa: F401 (seed variants, made on request)
