"""Training on a single-file SD checkpoint (with `model.config_dir` and `model.tokenizer`) gives the LoRA
that training on the pipeline folder the file was written from gives."""
import json
from types import SimpleNamespace

from safetensors import safe_open
from safetensors.torch import load_file

from adapterkit.train.jobs.lora import main
from support.fixtures import alias
from support.recipes import lora_recipe as recipe
from support.single_files import configs_only as _configs_only
from support.single_files import single_file as _single_file

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")


def test_a_single_file_base_trains_the_lora_its_folder_trains(pipeline, images, tmp_path):  # noqa: F811
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel
    parts = SimpleNamespace(vae=AutoencoderKL.from_pretrained(pipeline / "vae"),
                            text_encoder=CLIPTextModel.from_pretrained(pipeline / "text_encoder"))
    single = _single_file(pipeline, parts, tmp_path / "model.safetensors")
    configs = _configs_only(pipeline, tmp_path / "part-configs")
    over = {"train.steps": 2, "output.checkpoint_every": 0}
    from_folder = main(recipe(pipeline, images, tmp_path / "folder", **over))
    from_file = main(recipe(single, images, tmp_path / "file", **over, **{
        "model.config_dir": str(configs), "model.tokenizer": str(pipeline / "tokenizer")}))

    a, b = (load_file(str(out / "lora.peft.safetensors")) for out in (from_folder, from_file))
    assert a.keys() == b.keys()               # the same up to float rounding (4e-7 on weights of ~0.1)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(k for k in a if "lora_B" in k and a[k].any())            # it trained
    with safe_open(str(from_file / "lora.safetensors"), "pt") as f:
        model = json.loads(f.metadata()["adapterkit.training_config"])["model"]
    assert model["base"] == "model.safetensors" and model["config_dir"] == "part-configs"   # no full paths
    assert model["tokenizer"] == "tokenizer"
