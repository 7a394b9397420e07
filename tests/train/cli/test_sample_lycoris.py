"""`adapterkit sample --lora` takes any adapter kind: the command runs with a LoHa file, and the
loader it uses steers the U-Net by the file's weight (at weight 0 the prediction is the base's
exactly, the same rule as a LoRA's)."""
import torch

from adapterkit.adapters.lycoris import LycorisSpec, add_lycoris
from adapterkit.adapters.lycoris_files import save_lycoris
from adapterkit.train.cli.main import main as cli
from adapterkit.train.cli.sample import check_loras, load_loras
from adapterkit.train.pipeline.base import load_base
from support.fixtures import alias

pipeline = alias("pipeline", "lora_pipeline")


def prediction(unet):
    g = torch.Generator().manual_seed(3)
    cfg = unet.config
    with torch.no_grad():
        return unet(torch.randn(1, cfg.in_channels, 16, 16, generator=g), torch.tensor([400]),
                    torch.randn(1, 7, cfg.context_dim, generator=g))


def test_sample_takes_a_loha_and_its_weight_steers(pipeline, tmp_path):
    unet = load_base(pipeline).unet
    add_lycoris(unet, LycorisSpec("loha", rank=4, alpha=4, targets="attn-ff"), "a")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    loha = tmp_path / "style.safetensors"
    save_lycoris(unet, loha, "a", fmt="kohya")
    check_loras([f"{loha}:1"])                                  # read before the base loads: accepted
    base = prediction(load_base(pipeline).unet)
    for weight, same in ((0.0, True), (1.0, False)):
        model = load_base(pipeline)
        load_loras(model, [f"{loha}:{weight}"])
        assert torch.equal(prediction(model.unet), base) is same
    assert cli(["sample", "--base", str(pipeline), "--lora", f"{loha}:0.5", "--prompt", "a red shape",
                "--steps", "2", "--seed", "0", "-o", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
