"""Fixtures of the adapter tests."""
import logging

import pytest


@pytest.fixture
def lycoris_network():
    """lycoris-lora's LycorisNetwork aimed at our U-Net's blocks, kohya-named; its class-level preset
    is put back afterwards."""
    from lycoris import LycorisNetwork

    keep = {k: getattr(LycorisNetwork, k) for k in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME",
                                                     "LORA_PREFIX")}
    blocks = ["SpatialTransformer", "ResnetBlock", "Downsample", "Upsample"]
    LycorisNetwork.apply_preset({"target_module": blocks, "target_name": [], "lora_prefix": "lora_unet"})
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    yield LycorisNetwork
    for k, v in keep.items():
        setattr(LycorisNetwork, k, v)
