"""lycoris-lora 4.1.3's own networks on adapterkit's U-Net: the independent writer of LyCORIS files
(the `lycoris_network` fixture: tests/adapters/conftest.py)."""
import warnings

import torch


def written_by_lycoris(network, host, path, algo: str, options: dict, seed: int = 5):
    """A `network` (the fixture's class) of `algo` on `host` (rank 4, alpha 2; convs rank 3, alpha 1.5),
    every tensor moved off its init by seeded noise, saved by lycoris-lora to `path`; returns the network
    (its modules' get_weight / make_weight are the oracle's ΔW)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = network(host, multiplier=1.0, lora_dim=4, alpha=2, conv_lora_dim=3, conv_alpha=1.5,
                      network_module=algo, **options)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    net.save_weights(str(path), torch.float32, {})
    return net
