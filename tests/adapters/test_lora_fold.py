"""adapters.lora.folded_loras: the active adapters folded into the base weights for inference give the
unfolded model's output (to rounding), at each adapter's weight, and the base weights come back bit
for bit afterwards (issue 22: the demo's sampling at the plain U-Net's speed)."""
import torch

from adapterkit.adapters.lora import LoraSpec, add_lora, folded_loras, lora_layers, set_lora_weights
from support.unets import inputs, random_unet


def test_folded_matches_attached_and_restores_exactly():
    unet = random_unet()
    add_lora(unet, LoraSpec(rank=4, targets="full"), name="a")
    add_lora(unet, LoraSpec(rank=2, targets="attn"), name="b")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            for name in layer.lora_B:
                layer.lora_B[name].weight.normal_(0, 0.05, generator=g)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x = inputs()[:3]
    for weights in ({"a": 1.0, "b": 0.5}, {"a": 0.0, "b": 0.0}, {"a": 0.7}):
        set_lora_weights(unet, weights)
        with torch.no_grad():
            attached = unet(*x)
            with folded_loras(unet):
                folded = unet(*x)
                assert any(layer.merged for layer in lora_layers(unet).values())
        assert (folded - attached).abs().max() <= 1e-5 * max(1.0, attached.abs().max().item())
        assert not any(layer.merged for layer in lora_layers(unet).values())
    plain = random_unet()
    with torch.no_grad():
        assert (unet(*x) - attached).abs().max() == 0          # still attached, not folded
        assert (plain(*x) - attached).abs().max() > 1e-3       # and the LoRAs do something
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
