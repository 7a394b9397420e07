"""Pinned runs: a small LoRA and ControlNet recipe on fixed data produce the tensors fingerprinted in
tests/train/jobs/pinned_runs.json (per tensor: sums, norm, end values). The code before and after
the restructuring into sub-packages gave bit-identical files on one machine; a refactor keeps the
fingerprints, while a reordered random draw, a lost cast or a changed default moves them by far more
than the tolerance. A change meant to alter results rewrites them in the same commit
(`PYTHONPATH=tests python3 tests/train/jobs/test_pinned_runs.py`) and says why.

Exact hashes of the tensors are not stable across CPUs even for one torch wheel (vector widths change
the order of the sums: two machines gave different bytes), hence a tolerance. Adam amplifies those
rounding differences where a gradient is near zero: between two CPUs (2026-12) single values of a
4-step run differed by up to 1e-5 and a tensor's sum by 5e-4 of itself. The tolerance (4e-5 + 1e-3
relative) sits above that and below the ~lr = 1e-4 per value and step that a real change moves a
tensor by. Metadata is not compared: it holds the run's
temporary paths."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterkit.train.jobs.controlnet import main as train_controlnet
from adapterkit.train.jobs.lora import main as train_lora
from support.recipes import controlnet_recipe, lora_recipe

PINNED = Path(__file__).parent / "pinned_runs.json"
LORA_FILES = ("lora.safetensors", "lora.peft.safetensors")


def adapter_files(out: Path) -> dict[str, Path]:
    files = sorted(out.glob("*.safetensors")) + sorted(out.glob("*/*.safetensors"))
    return {f.relative_to(out).as_posix(): f for f in files}


def fingerprint(path: Path) -> dict[str, list]:
    """Per tensor: dtype, shape, sum, sum of |x|, L2 norm and the first and last 4 values (float64)."""
    out = {}
    for key, t in sorted(load_file(str(path)).items()):
        x = t.double().flatten()
        out[key] = [str(t.dtype), list(t.shape), x.sum().item(), x.abs().sum().item(), x.norm().item(),
                    *x[:4].tolist(), *x[-4:].tolist()]
    return out


def assert_pinned(got: dict[str, Path], job: str) -> None:
    pinned = json.loads(PINNED.read_text())[job]
    assert sorted(got) == sorted(pinned)
    for name, path in got.items():
        ours, want = fingerprint(path), pinned[name]
        assert sorted(ours) == sorted(want), name
        for key, (dtype, shape, *values) in want.items():
            assert ours[key][:2] == [dtype, shape], (name, key)
            torch.testing.assert_close(torch.tensor(ours[key][2:], dtype=torch.float64),
                                       torch.tensor(values, dtype=torch.float64), rtol=1e-3, atol=4e-5,
                                       msg=f"{name}: {key}")


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def lora_files(lora_pipeline, lora_images, tmp_path) -> dict[str, Path]:
    out = train_lora(lora_recipe(lora_pipeline, lora_images, tmp_path / "run"))
    return {name: out / name for name in LORA_FILES}


def controlnet_files(controlnet_pipeline, controlnet_images, tmp_path) -> dict[str, Path]:
    return adapter_files(train_controlnet(controlnet_recipe(controlnet_pipeline, controlnet_images,
                                                            tmp_path / "run")))


def test_the_lora_recipe_gives_the_pinned_files(lora_pipeline, lora_images, tmp_path):
    assert_pinned(lora_files(lora_pipeline, lora_images, tmp_path), "lora")


def test_the_controlnet_recipe_gives_the_pinned_file(controlnet_pipeline, controlnet_images, tmp_path):
    assert_pinned(controlnet_files(controlnet_pipeline, controlnet_images, tmp_path), "controlnet")


def repin(tmp: Path) -> None:
    """Rewrite the pinned fingerprints from this code (tensors only, no metadata)."""
    from adapterkit.unet import PRESETS
    from support.pictures import write_controlnet_folder, write_lora_folder
    from support.pipelines import build_tiny_pipeline, build_tiny_pipeline_8x_vae
    torch.set_num_threads(2)
    for sub in ("b1", "i1", "b2", "i2"):
        (tmp / sub).mkdir()
    runs = {"lora": lora_files(build_tiny_pipeline(tmp / "b1", PRESETS["tiny"]),
                               write_lora_folder(tmp / "i1"), tmp / "l"),
            "controlnet": controlnet_files(build_tiny_pipeline_8x_vae(tmp / "b2"),
                                           write_controlnet_folder(tmp / "i2"), tmp / "c")}
    pins = {job: {name: fingerprint(path) for name, path in files.items()} for job, files in runs.items()}
    PINNED.write_text(json.dumps(pins, indent=1) + "\n")


if __name__ == "__main__":
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        repin(Path(tmp))
