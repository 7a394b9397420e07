"""The adapter interface: every kind answers the same three questions (its module, what trains, what a
checkpoint keeps), and the answers are the tensors the kind really adds."""
import torch

from adapterkit.adapters.adapter import attach_layers, beside
from adapterkit.adapters.control_lora import train_as_low_rank
from adapterkit.adapters.controlnet import ControlNet
from adapterkit.adapters.lora import LoraSpec, add_lora
from adapterkit.adapters.lycoris import LycorisSpec
from support.unets import random_unet


def test_layer_adapters_train_their_factors_and_keep_every_adapter_tensor():
    unet = random_unet()
    add_lora(unet, LoraSpec(rank=2, targets="attn"), name="frozen", trainable=False)
    adapter = attach_layers(unet, LoraSpec(rank=4, targets="attn"))
    trainable, kept = adapter.trainable(), adapter.state()
    assert adapter.module is unet and trainable
    assert all(".lora_" in n and ".default." in n for n in trainable)
    frozen = [n for n in kept if ".frozen." in n]
    assert frozen and not set(frozen) & set(trainable) and set(trainable) < set(kept)
    assert all(".lora_" in n for n in kept)                   # no base weight is kept


def test_a_loha_trains_its_hadamard_factors():
    unet = random_unet()
    adapter = attach_layers(unet, LycorisSpec("loha", rank=4, alpha=4, targets="attn"))
    names = set(adapter.trainable())
    assert names and all(".hada_" in n for n in names)
    assert {n.split(".hada_")[1].split(".")[0] for n in names} == {"w1_a", "w1_b", "w2_a", "w2_b"}


def test_a_controlnet_trains_all_of_itself_and_a_control_lora_only_its_factors():
    unet = random_unet()
    cn = ControlNet.from_unet(unet)
    full = beside(cn, "ControlNet")
    assert set(full.trainable()) == {n for n, _ in cn.named_parameters()} == set(full.state())
    low = ControlNet.from_unet(unet)
    train_as_low_rank(low, 2)
    adapter = beside(low, "ControlNet")
    assert set(adapter.trainable()) == set(adapter.state())    # the frozen base encoder is rebuilt on resume
    assert all(p.requires_grad for p in adapter.trainable().values())
    assert any(not p.requires_grad for p in low.parameters())
    assert sum(p.numel() for p in adapter.trainable().values()) < sum(p.numel() for p in cn.parameters())
    assert all(isinstance(t, torch.Tensor) for t in adapter.state().values())
