"""unet: an SD-compatible conditional U-Net whose module names are diffusers' weight format."""
from .checkpoint import infer_unet_config, load_unet, save_unet, unet_fingerprint
from .conditioning import Conditioning, as_conditioning
from .config import PRESETS, Stage, UNetConfig
from .families import FAMILIES, Family, family_named, family_of
from .ldm_keys import ldm_key_map
from .model import Encoder, Features, UNet
from .weights import CheckpointError, atomic_write, read_header, read_weights, stored_dtype, write_safetensors

__all__ = ["PRESETS", "Stage", "UNetConfig", "UNet", "Encoder", "Features",
           "load_unet", "save_unet", "CheckpointError", "infer_unet_config", "unet_fingerprint",
           "ldm_key_map", "read_header", "read_weights", "stored_dtype", "write_safetensors", "atomic_write",
           "FAMILIES", "Family", "family_named", "family_of", "Conditioning", "as_conditioning"]
