"""Pinned runs: a small LoRA and ControlNet recipe on fixed data produce files whose tensors hash to
recorded values. Any change to the code's arithmetic (a refactor that should be behaviour-neutral,
a reordered random draw, a different cast) changes the hash; a change that is meant to alter results
updates the pins in the same commit and says why.

Only tensor bytes and the tensor layout are hashed: the metadata holds paths of this run's temporary
folders. The pins hold for the CPU wheel CI installs (torch 2.13) on this project's 2-core machines."""
import hashlib

import pytest
import torch
from safetensors.torch import load_file

from adapterkit.train.jobs.controlnet import main as train_controlnet
from adapterkit.train.jobs.lora import main as train_lora
from support.recipes import controlnet_recipe, lora_recipe

PINS = {
    "lora.safetensors": "3f9762543471a9d0b6743d7c71cdd22a27e851ca04c3fd0cb395e2fd80fec43c",
    "lora.peft.safetensors": "6d3837d47682f0f901c30f6eea32b72ad7fadee5c0fdc4a815902eaddf9168c9",
    "controlnet": "cd9123702c1226b0a8c954a049890e20f7d838fbf43089f27c245c97573ebb85",
}


def tensor_digest(path) -> str:
    h = hashlib.sha256()
    tensors = load_file(str(path))
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_lora_recipe_gives_the_pinned_files(lora_pipeline, lora_images, tmp_path):
    out = train_lora(lora_recipe(lora_pipeline, lora_images, tmp_path / "run"))
    got = {name: tensor_digest(out / name) for name in ("lora.safetensors", "lora.peft.safetensors")}
    assert got == {k: PINS[k] for k in got}


def test_the_controlnet_recipe_gives_the_pinned_file(controlnet_pipeline, controlnet_images, tmp_path):
    out = train_controlnet(controlnet_recipe(controlnet_pipeline, controlnet_images, tmp_path / "run"))
    files = sorted(out.glob("*.safetensors")) + sorted(out.glob("*/*.safetensors"))
    got = hashlib.sha256("".join(f"{f.relative_to(out)}={tensor_digest(f)};" for f in files).encode())
    assert got.hexdigest() == PINS["controlnet"]
