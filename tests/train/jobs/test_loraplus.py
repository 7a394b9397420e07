"""LoRA+ (`lora.loraplus_lr_ratio`, Hayou et al. 2024): every up matrix B learns at the ratio times its
module's rate, the down matrices A at the rate itself; a LyCORIS kind without a B is refused.

AdamW's first step moves each parameter by lr * g / (|g| + eps), i.e. by its learning rate wherever its
gradient is not tiny; with B zero-initialised only B has a gradient at step 1, so after one step the
largest |B| entry is B's learning rate, read back from the exported file."""
import pytest
import torch
from safetensors.torch import load_file

from adapterkit.train.config import ConfigError
from adapterkit.train.jobs.lora import main
from support.fixtures import alias
from support.recipes import lora_recipe as recipe

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")

LR, TE_LR = 1e-3, 4e-4


def largest_up(path, prefix: str) -> float:
    weights = load_file(str(path))
    ups = [w.abs().max() for k, w in weights.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
    assert ups, f"no {prefix}* up matrices in {sorted(weights)[:4]}"
    return float(torch.stack(ups).max())


@pytest.mark.parametrize("ratio", [None, 16.0])
def test_the_up_matrices_step_at_ratio_times_their_modules_rate(pipeline, images, tmp_path, ratio):
    options = {"train.steps": 1, "optim.lr": LR, "optim.max_grad_norm": 0, "output.checkpoint_every": 0,
               "lora.text_encoder.enabled": True, "lora.text_encoder.lr": f"[{TE_LR}]"}
    if ratio is not None:
        options["lora.loraplus_lr_ratio"] = ratio
    out = main(recipe(pipeline, images, tmp_path / "run", **options))
    scale = ratio or 1.0
    lora = out / "lora.safetensors"
    assert largest_up(lora, "lora_unet_") == pytest.approx(LR * scale, rel=1e-3)
    assert largest_up(lora, "lora_te_") == pytest.approx(TE_LR * scale, rel=1e-3)


def test_loraplus_is_checked_in_the_recipe(pipeline, images, tmp_path):
    with pytest.raises(ConfigError, match=r"loraplus_lr_ratio scales the up matrix B of a LoRA; kind loha"):
        recipe(pipeline, images, tmp_path, **{"lora.kind": "loha", "lora.loraplus_lr_ratio": 16})
    for bad, said in ((0, "must be > 0, got 0"), (-2, "must be > 0, got -2"),
                      ("inf", "not a finite number")):
        with pytest.raises(ConfigError, match=f"loraplus_lr_ratio.*{said}"):
            recipe(pipeline, images, tmp_path, **{"lora.loraplus_lr_ratio": bad})
    recipe(pipeline, images, tmp_path, **{"lora.kind": "dora", "lora.loraplus_lr_ratio": 16,   # DoRA has a B
                                          "output.formats": "[kohya]"})
    # prodigyopt refuses parameter groups with rates of their own: said at load, not at the first step
    with pytest.raises(ConfigError, match=r"lora.loraplus_lr_ratio gives some tensors another learning rate"):
        recipe(pipeline, images, tmp_path, **{"optim.optimizer": "prodigy", "optim.lr": 1.0,
                                              "lora.loraplus_lr_ratio": 16})
    with pytest.raises(ConfigError, match=r"lora.text_encoder.lr \[0.5\] gives some tensors another"):
        recipe(pipeline, images, tmp_path, **{"optim.optimizer": "prodigy", "optim.lr": 1.0,
                                              "lora.text_encoder.enabled": True,
                                              "lora.text_encoder.lr": "[0.5]"})


def test_resume_equals_the_uninterrupted_run_with_loraplus_and_the_text_encoders_rate(pipeline, images,
                                                                                    tmp_path, monkeypatch):
    import adapterkit.train.jobs.lora as lt
    from support.recipes import crash_then_resume

    options = {"train.steps": 5, "lora.loraplus_lr_ratio": 16, "lora.text_encoder.enabled": True,
               "lora.text_encoder.lr": f"[{TE_LR}]", "optim.schedule": "cosine"}
    straight = main(recipe(pipeline, images, tmp_path / "straight", **options))
    def run():
        return lt.main(recipe(pipeline, images, tmp_path / "resumed", **options))

    resumed = crash_then_resume(monkeypatch, lt, run, at_call=4)
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
