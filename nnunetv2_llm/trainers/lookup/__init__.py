"""The folder ``nnUNet_extTrainer`` points at (``nnunetv2_llm info --exports``), shipped inside the package so that
an installed wheel works as a source checkout does. nnU-Net imports the modules here by bare name."""
