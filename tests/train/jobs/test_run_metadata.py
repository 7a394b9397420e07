"""The training record in adapter files (train/jobs/run_metadata.py): kohya's `ss_*` keys and
ModelSpec's `modelspec.*`, read back the way A1111's Lora extension reads them
(extensions-builtin/Lora: network.py detect_version and alias, ui_edit_user_metadata.py's table and
tags), every value a string, no absolute path anywhere; older files without them still load."""
import datetime
import hashlib
import json
import re
import time

import pytest
from safetensors import safe_open

from adapterkit.adapters.lycoris_files import load_adapter_file
from adapterkit.train.jobs.lora import main
from adapterkit.train.jobs.recipe import public_recipe
from adapterkit.train.jobs.run_metadata import OLD_HASH_BYTES, OLD_HASH_OFFSET, file_hashes
from adapterkit.unet import PRESETS, UNet
from support.fixtures import alias
from support.recipes import lora_recipe

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")


def header(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def a1111_read(md: dict[str, str]) -> dict:
    """What A1111 makes of a LoRA's header: sd_models.read_metadata_from_safetensors parses a value
    that starts with "{" as JSON; network.py picks the version and alias; ui_edit_user_metadata.py
    builds its table and the tag list."""
    meta = {}
    for k, v in md.items():
        if isinstance(v, str) and v[0:1] == "{":
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        meta[k] = v
    version = ("SDXL" if str(meta.get("ss_base_model_version", "")).startswith("sdxl_")
               else "SD2" if str(meta.get("ss_v2", "")) == "True" else "SD1" if meta else "Unknown")
    tags = {}
    for per_dir in meta.get("ss_tag_frequency", {}).values():
        for tag, n in per_dir.items():
            tags[tag.strip()] = tags.get(tag.strip(), 0) + int(n)
    resolutions = {}
    for bucket in meta.get("ss_bucket_info", {}).get("buckets", {}).values():
        r = bucket["resolution"]
        resolutions[f"{r[1]}x{r[0]}"] = resolutions.get(f"{r[1]}x{r[0]}", 0) + int(bucket["count"])
    return {
        "version": version, "alias": meta.get("ss_output_name"), "model": meta.get("ss_sd_model_name"),
        "trained": datetime.datetime.fromtimestamp(float(meta["ss_training_started_at"]), datetime.UTC),
        "dataset_size": sum(int(p.get("img_count", 0)) for p in meta.get("ss_dataset_dirs", {}).values()),
        "resolutions": resolutions, "tags": sorted(tags.items(), key=lambda kv: -kv[1]),
    }


ABSOLUTE = re.compile(r"(?<![\w.:/])/(?:[\w.+-]+/)+[\w.+-]*|[A-Za-z]:\\")


def absolute_paths(md: dict[str, str], *roots) -> list[str]:
    """Values naming an absolute path: one of `roots`, or anything that looks like /a/b/ or C:\\
    (URLs left out)."""
    bad = []
    for k, v in md.items():
        text = re.sub(r"https?://\S+", "", v)
        if any(str(r) in v for r in roots) or ABSOLUTE.search(text):
            bad.append(k)
    return bad


@pytest.fixture(scope="module")
def run(pipeline, images, tmp_path_factory):
    t0 = time.time()
    out = main(lora_recipe(pipeline, images, tmp_path_factory.mktemp("run") / "out",
                           **{"sample.prompts": "a red shape", "sample.seeds": "5", "sample.steps": 2}))
    return out, t0


def test_every_lora_file_has_the_ss_and_modelspec_keys_as_strings(run, pipeline):
    out, _ = run
    for name in ("lora.safetensors", "lora.peft.safetensors", "checkpoints/step-000002/lora.safetensors"):
        path = next(out.glob(name.replace("step-000002", "step-*2")))
        md = header(path)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
        for key in ("ss_session_id", "ss_training_started_at", "ss_training_finished_at", "ss_output_name",
                    "ss_sd_model_name", "ss_resolution", "ss_network_dim", "ss_network_alpha",
                    "ss_network_module", "ss_steps", "ss_epoch", "ss_num_train_images", "ss_tag_frequency",
                    "ss_dataset_dirs", "ss_bucket_info", "ss_learning_rate", "ss_mixed_precision",
                    "ss_base_model_version", "modelspec.sai_model_spec", "modelspec.architecture",
                    "modelspec.implementation", "modelspec.title", "modelspec.date", "modelspec.resolution",
                    "modelspec.prediction_type", "adapterkit.training_config", "adapterkit.precision"):
            assert key in md, (name, key)
        assert md["ss_steps"] == ("2" if "checkpoints" in name else "4"), name
        assert md["ss_network_dim"] == "4" and md["ss_network_module"] == "networks.lora"
        assert md["ss_resolution"] == "(32, 32)" and md["modelspec.resolution"] == "32x32"
        assert md["ss_sd_model_name"] == pipeline.name and md["ss_output_name"] == "lora"
        assert md["modelspec.architecture"].endswith("/lora") and md["modelspec.trigger_phrase"] == "sks"
        assert md["ss_mixed_precision"] == "no"          # fp32 base on the CPU
        assert json.loads(md["adapterkit.precision"])["base"] == "fp32"
        datetime.datetime.fromisoformat(md["modelspec.date"])


def test_a1111_reads_version_alias_date_dataset_resolutions_and_tags(run, pipeline, images):
    out, t0 = run
    seen = a1111_read(header(out / "lora.safetensors"))
    assert seen["version"] == "SD1" and seen["alias"] == "lora" and seen["model"] == pipeline.name
    assert abs(seen["trained"].timestamp() - t0) < 600
    assert seen["dataset_size"] == 16                         # the folder's pictures
    assert seen["resolutions"] == {"32x32": 15, "24x40": 1}   # A1111 prints height x width
    captions = [p.read_text() for p in sorted(images.glob("*.txt"))]
    assert seen["tags"][0] == ("sks", 16)                     # the trigger, on every picture
    assert dict(seen["tags"])["a red shape"] == sum(c == "a red shape" for c in captions)


def test_epochs_and_images_per_epoch(run):
    md = header(run[0] / "lora.safetensors")
    # 16 pictures in two buckets (15 + 1), batch 4: 4 + 1 batches an epoch; 4 steps are epoch 1
    assert md["ss_num_train_images"] == "16" and md["ss_num_batches_per_epoch"] == "5"
    assert md["ss_epoch"] == "1" and md["ss_num_epochs"] == "1"
    assert int(md["ss_session_id"]) < 2**32


def test_no_absolute_path_in_any_metadata(run, pipeline, images):
    out, _ = run
    for path in [*out.glob("*.safetensors"), *out.glob("checkpoints/*/*.safetensors")]:
        md = header(path)
        assert not absolute_paths(md, pipeline, images, out, out.parent), (path.name, absolute_paths(md))


def test_absolute_paths_in_any_recipe_field_are_cut_to_names(tmp_path):
    from adapterkit.train.config import load_config
    from adapterkit.train.jobs.controlnet import ControlNetRecipe
    cfg = load_config({"model": {"base": str(tmp_path / "base")}, "data": {"root": str(tmp_path / "img")},
                       "control": {"lora": f"{tmp_path}/style.safetensors:0.7"},
                       "sample": {"hints": [str(tmp_path / "h.png")]}}, ControlNetRecipe)
    text = json.dumps(public_recipe(cfg))
    assert str(tmp_path) not in text and "h.png" in text and "style.safetensors:0.7" in text


def test_single_file_base_hashes_as_a1111_and_kohya(tmp_path):
    blob = bytes(range(256)) * (3 * 2**20 // 256)             # 3 MiB
    f = tmp_path / "model.safetensors"
    f.write_bytes(blob)
    h = file_hashes(f)
    assert h["ss_new_sd_model_hash"] == hashlib.sha256(blob).hexdigest()
    assert h["ss_sd_model_hash"] == hashlib.sha256(
        blob[OLD_HASH_OFFSET:OLD_HASH_OFFSET + OLD_HASH_BYTES]).hexdigest()[:8]
    assert file_hashes(tmp_path) == {}                        # a diffusers folder: none


def test_an_older_file_without_the_training_keys_still_loads(run, tmp_path):
    import safetensors.torch
    src = run[0] / "lora.safetensors"
    tensors = safetensors.torch.load_file(str(src))
    old = {k: v for k, v in header(src).items()
           if not k.startswith(("ss_", "modelspec.")) or k in ("ss_network_dim", "ss_network_alpha")}
    old.pop("adapterkit.precision")
    safetensors.torch.save_file(tensors, str(tmp_path / "old.safetensors"), metadata=old)
    unet = UNet(PRESETS["tiny"])
    lora = load_adapter_file(unet, tmp_path / "old.safetensors")
    assert len(lora.modules) == len([k for k in tensors if k.endswith(".alpha")])


def test_sample_grid_carries_a1111_parameters_of_its_first_cell(run, pipeline):
    from PIL import Image
    params = Image.open(run[0] / "samples" / "final.png").info["parameters"]
    prompt, last = params.split("\n")
    assert prompt == "a red shape"                       # first column: LoRA x0, no <lora:...> tag
    assert last == f"Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 32x32, Model: {pipeline.name}"
