"""Entry point for nnU-Net's trainer lookup: ``export nnUNet_extTrainer=<repo>/trainers``.

nnU-Net imports the modules of this folder by bare name, so the classes live in the installed package.
"""

from nnunetv2_llm.trainers import *  # noqa: F401,F403
