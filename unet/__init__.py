"""unet: an SD-compatible conditional U-Net whose module names are diffusers' weight format."""
from .config import PRESETS, Stage, UNetConfig
from .model import Encoder, Features, UNet

__all__ = ["PRESETS", "Stage", "UNetConfig", "UNet", "Encoder", "Features"]
