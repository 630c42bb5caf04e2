"""Entry point for nnU-Net's trainer lookup: ``eval "$(nnunetv2_llm info --exports)"`` adds this folder to
``nnUNet_extTrainer``.

nnU-Net imports the modules of this folder by bare name (and drops them from ``sys.modules`` afterwards), so the
classes live in the installed package; seed variants (``{trainer}_seed{K}``) are made on request by the package's
module ``__getattr__``.
"""

from nnunetv2_llm.trainers import *  # noqa: F401,F403
from nnunetv2_llm.trainers import __getattr__  # noqa: F401
