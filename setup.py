"""Install galaxalign_dist. See the Makefile for the two-step install DeepSpeed needs."""

from setuptools import find_packages, setup

setup(
    name="galaxalign_dist",
    version="0.1.0",
    description="GalaxAlign tri-modal CLIP for galaxy morphology, trained with DeepSpeed ZeRO under Ray Train",
    python_requires=">=3.10",
    packages=find_packages(include=["galaxalign_dist", "galaxalign_dist.*"]),
    package_data={"galaxalign_dist": ["configs/*.yaml"]},
    install_requires=[
        # torch and torchvision are pinned as a pair: a free resolve can pick a torchvision whose
        # C extension does not match torch (then open_clip fails to import).
        "torch==2.15.0",
        "torchvision==0.29.2",
        # 3.3 is the version whose CustomTextCLIP/loss APIs the model and loss are written against.
        "open_clip_torch==3.3.0",
        # DeepSpeed is an sdist that imports torch in its build: the Makefile installs torch first.
        # Pinned because ZeRO internals we rely on (safe_get_full_fp32_param, zero_to_fp32
        # layout, CPU accelerator + gloo) change between minor releases.
        "deepspeed==0.19.8",
        # Ray Train V2 semantics (Tune drives a function that calls TorchTrainer.fit) are 2.5x+;
        # [default] brings the dashboard/State API that V2 needs to release placement groups.
        "ray[default,train,tune,data]==2.60.0",
        "pyarrow>=15",
        "numpy>=1.26",
        "tensorboard>=2.15",
        "h5py>=3.10",
        "pillow>=10",
        "pyyaml>=6",
        "safetensors>=0.4",
        "scikit-learn>=1.4",
        "matplotlib>=3.8",
        "faiss-cpu>=1.8",
        "optuna>=3.6",
        "tqdm>=4.66",
        "pandas>=2.0",
    ],
    # polars and duckdb: tests write the same catalogue with each writer users have (issue 18).
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "polars>=1.0", "duckdb>=1.0"]},
    entry_points={"console_scripts": ["galaxalign=galaxalign_dist.cli.main:main"]},
)
