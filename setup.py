"""megatron-rence: ReNCE (contrastive RL for LLM reasoning) at Megatron scale."""
from setuptools import find_packages, setup

setup(
    name="megatron-rence",
    version="0.1.0",
    description="ReNCE, GRPO, DAPO and online DPO with megatron-core trainers and colocated rollout engines",
    packages=find_packages(include=["megatron_rence", "megatron_rence.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "transformers>=4.51",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "math-verify[antlr4_13_2]>=0.7",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "numpy",
        "psutil",  # megatron dist_checkpointing torch_dist writer
    ],
    extras_require={
        "gpu": ["sglang>=0.5", "transformer-engine[pytorch]>=2.1"],
        # gguf + accelerate (small, pure Python) so that CI runs the GGUF converter's tests too
        "test": ["pytest>=8", "gguf==0.19.0", "accelerate==1.15.0"],
        "parquet": ["pyarrow>=14"],
        "plot": ["matplotlib>=3.7"],
        # tools/prepare_smollm2.py (the real-model CPU recipe): transformers reads GGUF files with these
        "real": ["gguf==0.19.0", "accelerate==1.15.0"],
        # tools/export_megatron_to_hf.py --quant fp8|nvfp4 (NVIDIA Model Optimizer). 0.46.1 is the newest whose
        # Megatron exporter imports with megatron-core 0.16.1 (0.47.0 needs megatron.core.models.hybrid)
        "export": ["nvidia-modelopt==0.46.1"],
    },
    entry_points={
        "console_scripts": [
            "rence-train=megatron_rence.train:main",
            "rence-eval=megatron_rence.evaluate:main",
            "rence-grade=megatron_rence.rewards.grade_cli:main",
            "rence-plan=megatron_rence.plan:main",
        ]
    },
)
