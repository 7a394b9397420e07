"""Random U-Nets, ControlNets and their inputs for the adapter tests."""
import torch

from adapterkit.adapters.controlnet import ControlNet, hint_widths_for
from adapterkit.unet import PRESETS, Stage, UNet

TINY = PRESETS["tiny"]
SD15ISH = PRESETS["sd15"].replace(
    stages=(Stage(32, heads=4), Stage(64, heads=4), Stage(64, heads=4), Stage(64, attention=False, heads=4)),
    context_dim=48)
# SDXL's block structure at 1/10 width: no attention in stage 0, transformer depths 2 and 3 below (the
# mid block takes the last), head width 16, linear proj_in/out; context 64 (two 32-wide text encoders),
# pooled text 32 + 6 ids x 8 sinusoidal features. Its LDM numbering is SDXL's (layers_per_block 2).
SDXL_TINY = PRESETS["sdxl"].replace(
    stages=(Stage(32, attention=False, heads=2), Stage(64, heads=4, depth=2), Stage(64, heads=4, depth=3)),
    context_dim=64, sample_size=16, pooled_dim=32, addition_time_embed_dim=8)


def random_unet(cfg=TINY, seed=0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


def inputs(cfg=TINY, batch=2, h=16, w=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.in_channels, h, w, generator=g), torch.tensor([5, 900])[:batch],
            torch.randn(batch, 7, cfg.context_dim, generator=g),
            torch.rand(batch, 3, 8 * h, 8 * w, generator=g))                   # hint: pixels, RGB in [0, 1]


def controlnet_for(base, seed: int = 0, zero: bool = True) -> ControlNet:
    cn = ControlNet.from_unet(base.unet, hint_widths=hint_widths_for(base.latent_scale))
    if not zero:                                               # as if trained: zero convs non-zero
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in [*cn.zero_convs(), cn.controlnet_cond_embedding.conv_out]:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
    return cn.eval()


def lowrank_trained(unet: UNet, rank: int, seed: int = 1, biases: bool = True) -> ControlNet:
    """A ControlNet whose encoder moved from the base by rank-`rank` steps per weight (biases and norms
    moved too unless not `biases`); the new layers are random."""
    cn = ControlNet.from_unet(unet).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith("controlnet_"):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
            elif p.ndim >= 2:
                flat = p.flatten(1)
                up = torch.randn(flat.shape[0], rank, generator=g) * 0.05
                down = torch.randn(rank, flat.shape[1], generator=g) * 0.05
                p.add_((up @ down).reshape(p.shape))
            elif biases:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return cn


def write_sdxl_lora(path, cfg=SDXL_TINY):
    """A kohya-layout SDXL LoRA named "style" at `path`, as after training: rank 4 on attention and
    feed-forward of a `random_unet(cfg)`, lora_up random. Returns `path`."""
    from adapterkit.adapters.lora import LoraSpec, add_lora, lora_layers
    from adapterkit.adapters.lora_files import save_lora

    unet = random_unet(cfg)
    add_lora(unet, LoraSpec(rank=4, alpha=2, targets="attn-ff"), "style")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            w = layer.lora_B["style"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    save_lora(unet, path, name="style", fmt="kohya")
    return path
