"""pixart_ds: train PixArt-alpha with DeepSpeed ZeRO-2, MosaicML Streaming and Slurm."""
__version__ = "0.1.0"
