from setuptools import find_packages, setup

# The repository's top-level folders install under one import root, ``pretrain``:
# PyPI already has packages named ``kernels``, ``tools`` and ``launch`` (transformers
# probes for Hugging Face's ``kernels``), so none of ours may be a top-level name.
ROOTS = {"pretrain": "pretrain", "pretrain.kernels": "kernels", "pretrain.launch": "launch", "pretrain.tools": "tools"}
PACKAGES = [sub for root, folder in ROOTS.items() for sub in [root, *(f"{root}.{p}" for p in find_packages(folder))]]

setup(
    name="medpretrain",
    version="0.1.0",
    description="Distributed pretraining of medical-imaging vision foundation models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=ROOTS,
    package_data={"pretrain.tools": ["*.sh"]},
    include_package_data=True,
    install_requires=[
        # torch and torchvision must be a matching pair; the regular (CUDA) build
        # also runs on CPU-only machines, the CPU-only wheel cannot load torchvision ops.
        "torch>=2.14,<2.15",
        "torchvision>=0.29,<0.30",
        "timm>=1.0.20,<2",
        "deepspeed>=0.17,<0.20",
        "webdataset>=0.2.100,<2",
        "braceexpand>=0.1.7",  # shard patterns like shard-{000000..000099}.tar
        "safetensors>=0.4,<1",
        "submitit>=1.5,<2",
        "tensorboard>=2.15,<3",
        "numpy>=1.26,<3",
        "pyyaml>=6,<7",
        "tqdm>=4.66,<5",
        "pillow>=10,<14",
        "tifffile>=2024.1.1",
        "pydicom>=3.0,<4",
        "nibabel>=5.0,<6",
        # text towers for CLIP-style image-report objectives; the demo's WordPiece tokenizer and BERT
        # <5.25: from 5.25 transformers requires Hugging Face's `kernels` package and imports it at start-up;
        # run from this checkout (python -m, tests, building the wheel: its setuptools hook loads
        # kernels._internals) the repository's kernels/ folder is found under that name instead and breaks it
        "transformers>=4.45,<5.25",
        "tokenizers>=0.20,<1",
        "huggingface-hub>=0.24,<3",  # pretrain export push (transformers needs it too)
        # pretrain scaling: L-BFGS fits, BLAS held to one thread during them, the study's figures
        "scipy>=1.11,<2",
        "threadpoolctl>=3.1,<4",
        "matplotlib>=3.8,<4",
        "psutil>=5.9",  # the thread plan looks at how busy the usable cores are at start
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6", "xformers>=0.0.28"],
        # JPEG / JPEG 2000 compressed DICOM pixel data
        "dicom-codecs": ["pylibjpeg>=2", "pylibjpeg-libjpeg>=2", "pylibjpeg-openjpeg>=2"],
        # monai: networks for ``model.name: monai:<network>`` (3D ResNets, SwinUNETR's encoder, ...)
        "monai": ["monai>=1.4,<2"],
        # open_clip: `pretrain export --target open_clip` checks a CLIP export by loading it there
        "open_clip": ["open_clip_torch>=3.0,<4"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100,<7", "scikit-learn>=1.3,<2", "monai>=1.4,<2", "open_clip_torch>=3.0,<4"],
    },
    entry_points={"console_scripts": ["pretrain=pretrain.tools.cli.main:main"]},
)
