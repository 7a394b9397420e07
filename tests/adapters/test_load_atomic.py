"""An adapter goes into a model whole or not at all (reliability.md B9): a load that fails half-way
through injection leaves every parameter bit-identical, the state dict with the same keys (no empty
peft wrapper, so no `to_q.base_layer.weight`), no adapter name on any module or in `peft_config`,
and the adapters already there, their activity and grad flags, as they were. For LoRA, the LyCORIS
kinds (LoHa, LoKr, DoRA) and a LoRA's text-encoder parts.

Half-way is made for real where a file can do it (a DoRA over layers holding a LoRA: peft injects, our
check refuses) and injected elsewhere: peft's `_create_and_replace` raises on the file's last layer,
after all the others were wrapped, or Ctrl-C arrives after the last tensor was copied.
"""
import hashlib

import pytest
import torch
from peft.tuners.loha.model import LoHaModel
from peft.tuners.lokr.model import LoKrModel
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from adapterkit.adapters.lora import (
    Lora,
    LoraSpec,
    add_lora,
    load_lora,
    lora_from_model,
    lora_names,
    lora_weights,
)
from adapterkit.adapters.lora_files import load_lora_file, read_lora, save_lora
from adapterkit.adapters.lora_text import TextLoraSpec, add_text_lora, load_text_lora, text_lora_from_model
from adapterkit.adapters.lycoris import LycorisSpec, add_lycoris, load_lycoris
from adapterkit.adapters.lycoris_files import read_lycoris, save_lycoris
from adapterkit.unet import UNet
from support.unets import TINY

PEFT_MODEL = {"loha": LoHaModel, "lokr": LoKrModel, "dora": LoraModel}


def state(model: nn.Module) -> dict:
    """What must not change: each state-dict key's dtype, shape and bytes, each module's name and type,
    the grad flags, and the adapter names on the model."""
    tensors = {k: (v.dtype, tuple(v.shape), hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes())
                   .hexdigest()) for k, v in model.state_dict().items()}
    return {"tensors": tensors,
            "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "grads": {n: p.requires_grad for n, p in model.named_parameters()},
            "adapters": lora_names(model), "config": hasattr(model, "peft_config")}


def dangling(model: nn.Module, name: str) -> list[str]:
    """Every place adapter `name` is still mentioned on the model's peft layers."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, BaseTunerLayer):
            for attr in (*m.adapter_layer_names, *m.other_param_names):
                if name in getattr(m, attr, {}):
                    out.append(f"{path}.{attr}")
            if name in m.active_adapters:
                out.append(f"{path} (active)")
    return out


def fail_on_call(monkeypatch, cls, n: int):
    """peft's `cls._create_and_replace` raises on its `n`-th call: the layers before it are wrapped."""
    real, calls = cls._create_and_replace, []

    def create(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("peft failed on this layer")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, "_create_and_replace", create)
    return calls


def base(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(TINY).eval()


def random_b(model: nn.Module, name: str, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".lora_B.{name}." in n or f".hada_w2_b.{name}" in n or f".lokr_w1.{name}" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory):
    model = base(5)
    add_lora(model, LoraSpec(rank=2, alpha=2, targets="attn-ff"), "s")
    random_b(model, "s")
    path = tmp_path_factory.mktemp("lora") / "s.safetensors"
    save_lora(model, path, "s")
    return path


def with_other_adapter() -> UNet:
    """A U-Net already holding a trainable LoRA "keep" on the attention layers (only some of the file's)."""
    model = base()
    add_lora(model, LoraSpec(rank=2, alpha=2, targets="attn"), "keep")
    random_b(model, "keep", seed=9)
    return model


def assert_untouched(model: nn.Module, before: dict, name: str) -> None:
    assert state(model) == before
    assert name not in lora_names(model) and not dangling(model, name)


@pytest.mark.parametrize("make", [base, with_other_adapter], ids=["bare", "holding another LoRA"])
def test_a_lora_whose_last_layer_fails_in_peft_leaves_the_model_as_it_was(make, lora_path, monkeypatch):
    model = make()
    before, out = state(model), model(*inputs())
    lora = read_lora(lora_path, base=TINY)
    calls = fail_on_call(monkeypatch, LoraModel, len(lora.modules))
    with pytest.raises(RuntimeError, match="peft failed"):
        load_lora(model, lora, "s")
    assert len(calls) == len(lora.modules)                       # every earlier layer had been wrapped
    assert_untouched(model, before, "s")
    torch.testing.assert_close(model(*inputs()), out, rtol=0, atol=0)
    monkeypatch.undo()
    load_lora(model, lora, "s")                                  # and the name is free to load again
    assert "s" in lora_names(model)


def test_ctrl_c_after_the_last_copy_takes_the_whole_adapter_out(lora_path, monkeypatch):
    model = with_other_adapter()
    before = state(model)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr("adapterkit.adapters.lora.set_lora_weights", interrupted)  # the weight, last step
    with pytest.raises(KeyboardInterrupt):
        load_lora_file(model, lora_path, "s", weight=0.5)
    assert_untouched(model, before, "s")
    assert lora_weights(model) == {"keep": 1.0}


def test_a_file_whose_last_module_does_not_fit_changes_nothing(lora_path, tmp_path):
    """The check before injection: the last module in key order has a lora_down one column too wide."""
    lora = read_lora(lora_path, base=TINY)
    last = sorted(lora.modules)[-1]
    m = lora.modules[last]
    lora.modules[last] = type(m)(torch.zeros(m.down.shape[0], m.down.shape[1] + 1), m.up, m.alpha)
    model = with_other_adapter()
    before = state(model)
    with pytest.raises(ValueError, match="1 shape mismatches"):
        load_lora(model, lora, "s")
    assert_untouched(model, before, "s")


@pytest.fixture(scope="module")
def lycoris_paths(tmp_path_factory):
    paths = {}
    for kind in PEFT_MODEL:
        model = base(5)
        add_lycoris(model, LycorisSpec(kind, rank=2, alpha=2, targets="attn-ff"), "s")
        random_b(model, "s")
        paths[kind] = tmp_path_factory.mktemp(kind) / f"{kind}.safetensors"
        save_lycoris(model, paths[kind], "s")
    return paths


@pytest.mark.parametrize("kind", list(PEFT_MODEL))
def test_a_lycoris_file_whose_last_layer_fails_in_peft_leaves_the_model_as_it_was(kind, lycoris_paths,
                                                                                   monkeypatch):
    model = base() if kind == "dora" else with_other_adapter()   # DoRA over a LoRA is refused (below)
    before = state(model)
    lyco = read_lycoris(lycoris_paths[kind], base=TINY)
    fail_on_call(monkeypatch, PEFT_MODEL[kind], len(lyco.modules))
    with pytest.raises(RuntimeError, match="peft failed"):
        load_lycoris(model, lyco, "s")
    assert_untouched(model, before, "s")


def test_a_dora_refused_after_peft_wrapped_its_layers_leaves_no_wrapper():
    """For real: peft injects the DoRA (attn-ff: the LoRA's attention layers and new feed-forward
    ones), then our check refuses the attention layers, where peft built its row-wise DoRA."""
    model = with_other_adapter()
    before = state(model)
    with pytest.raises(ValueError, match="already carry a LoRA adapter"):
        add_lycoris(model, LycorisSpec("dora", rank=2, alpha=2, targets="attn-ff"), "d")
    assert_untouched(model, before, "d")


def tiny_clip(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=8)).eval()


def test_a_text_encoder_part_that_fails_takes_the_parts_before_it_out(monkeypatch):
    """Two encoders (SDXL's shape of a file): the second encoder's last layer fails in peft after the
    first encoder's part went in; both encoders end as they began."""
    encoders = {"text_encoder": tiny_clip(0), "text_encoder_2": tiny_clip(1)}
    trained = {folder: tiny_clip(i) for i, folder in enumerate(encoders)}
    modules = {}
    for folder, encoder in trained.items():
        add_text_lora(encoder, TextLoraSpec(rank=2, alpha=2), "s")
        random_b(encoder, "s")
        modules |= text_lora_from_model(folder, encoder, "s")
    lora = Lora(modules)
    before = {folder: state(e) for folder, e in encoders.items()}
    fail_on_call(monkeypatch, LoraModel, len(modules))
    with pytest.raises(RuntimeError, match="peft failed"):
        load_text_lora(encoders, lora, "s")
    for folder, encoder in encoders.items():
        assert_untouched(encoder, before[folder], "s")


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([5]), torch.randn(1, 7, TINY.context_dim,
                                                                                 generator=g))


def test_a_base_whose_text_encoder_part_fails_keeps_no_unet_part(lora_pipeline, tmp_path, monkeypatch):
    """`load_lora_on_base`: the U-Net part goes in first; the text encoder's last layer fails in peft;
    the U-Net and the text encoder end as they began."""
    from adapterkit.train.pipeline.base import load_base
    from adapterkit.train.pipeline.loras import load_lora_on_base

    made = load_base(lora_pipeline)
    add_lora(made.unet, LoraSpec(rank=2, alpha=2, targets="attn"), "s")
    add_text_lora(made.text_encoder, TextLoraSpec(rank=2, alpha=2), "s")
    random_b(made.unet, "s")
    random_b(made.text_encoder, "s")
    path = tmp_path / "s.safetensors"
    save_lora(made.unet, path, "s", text_encoders={"text_encoder": made.text_encoder})
    lora = read_lora(path)
    target = load_base(lora_pipeline)
    before = {"unet": state(target.unet), "text": state(target.text_encoder)}
    fingerprint = target.fingerprint
    calls = fail_on_call(monkeypatch, LoraModel, len(lora.modules))
    with pytest.raises(RuntimeError, match="peft failed"):
        load_lora_on_base(target, path, "s")
    assert len(calls) == len(lora.modules) > len(lora_from_model(made.text_encoder, "s").modules)
    assert_untouched(target.unet, before["unet"], "s")
    assert_untouched(target.text_encoder, before["text"], "s")
    assert target.fingerprint == fingerprint


def test_a_name_already_taken_leaves_that_adapter_in_place(lora_path):
    """The guard refuses a name the model has before anything runs: undoing would delete that adapter."""
    encoders = {"text_encoder": tiny_clip(0)}
    add_text_lora(encoders["text_encoder"], TextLoraSpec(rank=2, alpha=2), "s")
    before = state(encoders["text_encoder"])
    lora = Lora(text_lora_from_model("text_encoder", encoders["text_encoder"], "s"))
    with pytest.raises(ValueError, match="already has"):
        load_text_lora(encoders, lora, "s")
    assert state(encoders["text_encoder"]) == before and lora_names(encoders["text_encoder"]) == ["s"]
