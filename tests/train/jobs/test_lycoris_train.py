"""The LoRA job trains every adapter kind (`lora.kind: lora | locon | loha | lokr | dora`) through
peft's layers: the exported file holds that kind in the layout its readers take, checkpoints carry its
tensors (resume == uninterrupted), the first-step gradient check knows each kind's zero factor, and
recipes that ask for a layout the kind has no form in fail when loaded."""
import json

import pytest

import adapterkit.adapters.adapter as adapter_mod
import adapterkit.train.jobs.lora as lt
from adapterkit.adapters.lycoris_files import read_lycoris
from adapterkit.train.config import ConfigError
from adapterkit.train.jobs.lora import main
from support.fixtures import alias
from support.recipes import last_adapter_state as _adapter
from support.recipes import lora_recipe as recipe

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")

KINDS = {
    "loha": ({"lora.kind": "loha", "lora.targets": "full", "output.formats": "kohya"}, "loha", ".hada_w2_b."),
    "lokr": ({"lora.kind": "lokr", "lora.tucker": "true", "lora.targets": "full", "output.formats": "kohya"},
             "lokr", ".lokr_w1."),
    "dora": ({"lora.kind": "dora", "output.formats": "kohya"}, "dora", ".lora_magnitude_vector."),
    "dora-output": ({"lora.kind": "dora", "lora.dora_axis": "output", "output.formats": "peft"}, "dora (row)",
                    ".lora_magnitude_vector."),
    "locon": ({"lora.kind": "locon", "lora.targets": "full"}, "lora", ".lora_B."),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_trains_and_exports_its_file(pipeline, images, tmp_path, kind):
    overrides, label, part = KINDS[kind]
    out = main(recipe(pipeline, images, tmp_path / "run", **overrides))
    fmt = overrides.get("output.formats")
    names = {"kohya": "lora.safetensors", "peft": "lora.peft.safetensors"}
    written = sorted(p.name for p in out.glob("lora*.safetensors"))
    assert written == sorted(names[f] for f in ([fmt] if fmt else ["kohya", "peft"]))
    lyco = read_lycoris(out / names[fmt or "kohya"])
    assert set(lyco.kinds()) == {label}
    assert json.loads(lyco.metadata["adapterkit.training_config"])["lora"]["kind"] == overrides["lora.kind"]
    state = _adapter(out)
    assert any(part in k for k in state), sorted(state)[:4]
    moved = [m for m in lyco.modules.values() if m.dora_scale is None or m.kind == "lora"]
    assert any(t.abs().max() > 0 for m in moved for t in m.tensors.values())


def test_a_loha_run_resumes_exactly(pipeline, images, tmp_path, monkeypatch):
    overrides = KINDS["loha"][0] | {"train.grad_accum": 2}
    straight = main(recipe(pipeline, images, tmp_path / "straight", **overrides))
    real_step, calls = lt.train_step, []

    def crash_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(lt, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(recipe(pipeline, images, tmp_path / "resumed", **overrides))
    monkeypatch.setattr(lt, "train_step", real_step)
    resumed = main(recipe(pipeline, images, tmp_path / "resumed", **overrides))
    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys() and any(".hada_" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_a_loha_whose_zero_factor_gets_no_gradient_stops_the_run(pipeline, images, tmp_path, monkeypatch):
    real_add = adapter_mod.add_lycoris

    def add_and_bypass_one_layer(model, spec, *args, **kwargs):
        real_add(model, spec, *args, **kwargs)
        layer = next(m for n, m in model.named_modules() if n.endswith("attn1.to_q"))
        layer.forward = lambda x, *a, **k: layer.base_layer(x)

    monkeypatch.setattr(adapter_mod, "add_lycoris", add_and_bypass_one_layer)
    with pytest.raises(RuntimeError, match=r"got no gradient at step 1.*attn1\.to_q\.hada_w2_b"):
        main(recipe(pipeline, images, tmp_path / "run", **KINDS["loha"][0]))


@pytest.mark.parametrize("overrides, match", [
    ({"lora.kind": "loha"}, r"output.formats \['peft'\] cannot hold a loha adapter .* \['kohya'\]"),
    ({"lora.kind": "dora", "lora.dora_axis": "output", "output.formats": "kohya"},
     r"\['kohya'\] cannot hold a dora"),
    ({"lora.kind": "locon"}, "kind locon is LoRA on the ResNet convs too: set targets: full"),
    ({"lora.tucker": "true"}, "tucker do not apply to kind lora"),
    ({"lora.kind": "lokr", "lora.factor": "0", "output.formats": "kohya"}, "LoKr factor must be -1"),
])
def test_recipes_the_kind_cannot_satisfy_fail_when_loaded(pipeline, images, tmp_path, overrides, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        recipe(pipeline, images, tmp_path / "run", **overrides)


def test_a_lokr_factor_that_does_not_divide_the_dims_fails_before_training(pipeline, images, tmp_path):
    cfg = recipe(pipeline, images, tmp_path / "run",
                 **{"lora.kind": "lokr", "lora.factor": "3", "output.formats": "kohya"})
    with pytest.raises(ValueError, match="LoKr factor 3 does not divide"):
        main(cfg)
    assert not list((tmp_path / "run").glob("*.safetensors"))
