from setuptools import find_packages, setup

setup(
    name="nnunetv2-llm",
    version="0.1.0",
    description="A frozen pre-trained LLM transformer layer at the bottleneck of nnU-Net v2, with controls and honest comparison",
    packages=find_packages(include=["nnunetv2_llm", "nnunetv2_llm.*"]),
    package_data={"nnunetv2_llm": ["data/Task04_Hippocampus/*.json", "data/Task04_Hippocampus/*.txt",
                                    "data/Task04_Hippocampus/*/*.nii.gz"]},
    python_requires=">=3.10",
    install_requires=[
        "nnunetv2==2.8.1",
        "torch>=2.6,!=2.9.*",  # transformers 5 disables itself below 2.6; nnU-Net excludes 2.9
        "transformers>=5.0",
        "peft>=0.13",
        "safetensors>=0.4",
        "gguf>=0.10",
        "SimpleITK",
        "monai>=1.4",
        "scipy>=1.15",  # stats.bootstrap(rng=...)
        "pandas",
        "matplotlib",
        "seaborn",
        "rich",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["nnunetv2_llm=nnunetv2_llm.cli:main"]},
)
