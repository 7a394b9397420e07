"""The command line's conventions: `--version`, `train JOB CONFIG --print-config` (the resolved
recipe, reloadable), defaults in `--help`, and sample PNGs that carry A1111's infotext in their
`parameters` chunk, read back here by a parser written after A1111's own
(modules/infotext_utils.py parse_generation_parameters: its regular expression and quoting rules)."""
import hashlib
import json
import re
import typing
from importlib.metadata import version

import pytest
import yaml
from PIL import Image

from adapterkit.adapters.lora import LoraSpec, add_lora
from adapterkit.adapters.lora_files import save_lora
from adapterkit.train.config import load_config
from adapterkit.train.infotext import PARAMETERS, infotext
from adapterkit.train.infotext import SAMPLERS as A1111_SAMPLERS
from adapterkit.train.jobs.controlnet import ControlNetRecipe
from adapterkit.train.jobs.lora import LoraRecipe
from adapterkit.train.jobs.pretrain import PretrainRecipe
from adapterkit.train.jobs.recipe import SampleConfig
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.sampling import SAMPLERS
from support import REPO
from support.cli import run
from support.fixtures import alias

pipeline = alias("pipeline", "lora_pipeline")

# A1111 modules/infotext_utils.py: one `key: value` pair of the last line; a quoted value is JSON
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse(text: str) -> dict:
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        if in_negative:
            negative += ("" if not negative else "\n") + line
        else:
            prompt += ("" if not prompt else "\n") + line
    res = {"Prompt": prompt, "Negative prompt": negative}
    for k, v in RE_PARAM.findall(last):
        if v[:1] == '"' and v[-1:] == '"':
            v = json.loads(v)
        m = RE_SIZE.match(v)
        if m:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        run(["--version"], capsys)
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"adapterkit {version('adapterkit')} (torch ")


@pytest.mark.parametrize("job, recipe, cls", [("lora", "sd15_lora.yaml", LoraRecipe),
                                              ("controlnet", "sd15_controlnet.yaml", ControlNetRecipe),
                                              ("pretrain", "tiny_pretrain.yaml", PretrainRecipe)])
def test_print_config_is_the_resolved_recipe_and_reloads(job, recipe, cls, capsys, tmp_path):
    path = REPO / "configs" / recipe
    overrides = ["train.seed=7", f"output.dir={tmp_path / 'never'}"]
    code, out, err = run(["train", job, path, *overrides, "--print-config"], capsys)
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["train"]["seed"] == 7
    assert load_config(printed, cls) == load_config(path, cls, overrides)
    assert "lr" in printed["optim"] or job == "pretrain"            # defaults the file left out, filled in
    assert not (tmp_path / "never").exists()                         # nothing made, nothing run


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        run(["sample", "--help"], capsys)
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS (default: 25)" in text
    assert "--sampler {ddim,euler,dpmpp_2m,dpmpp_2m_karras} (default: ddim)" in text
    with pytest.raises(SystemExit):
        run(["train", "lora", "--help"], capsys)
    assert "--print-config" in capsys.readouterr().out


def test_every_sampler_is_a_choice_everywhere(capsys):
    # sampling.SAMPLERS is the list; the recipes' Literal, A1111's spellings and both CLIs follow it.
    names = tuple(SAMPLERS)
    assert typing.get_args(typing.get_type_hints(SampleConfig)["sampler"]) == names
    assert tuple(A1111_SAMPLERS) == names
    for command in ("sample", "quality"):
        with pytest.raises(SystemExit):
            run([command, "--help"], capsys)
        assert f"--sampler {{{','.join(names)}}}" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        run(["sample", "--base", "b", "--prompt", "p", "--sampler", "plms", "-o", "x.png"], capsys)
    err = capsys.readouterr().err
    assert "invalid choice: 'plms'" in err and "dpmpp_2m_karras" in err


def test_infotext_round_trips_through_a1111s_parser():
    text = infotext("a red star, on blue: sks", negative="blurry, dark", steps=20, sampler="euler",
                    guidance=7.5, seed=42, size=(640, 512), model="sd15", model_hash="0123456789",
                    loras=[("style", 0.8, "abcdefabcdef"), ("other", 1.0, "0123456789ab"),
                           ("off", 0.0, None)])
    got = a1111_parse(text)
    assert got["Prompt"] == "a red star, on blue: sks <lora:style:0.8> <lora:other:1>"
    assert got["Negative prompt"] == "blurry, dark"
    assert (got["Steps"], got["Sampler"], got["CFG scale"], got["Seed"]) == ("20", "Euler", "7.5", "42")
    assert (got["Size-1"], got["Size-2"]) == ("640", "512")
    assert (got["Model hash"], got["Model"]) == ("0123456789", "sd15")
    assert got["Lora hashes"] == "style: abcdefabcdef, other: 0123456789ab"   # quoted: one field
    assert "Negative prompt" not in infotext("x", steps=1, sampler="ddim", guidance=1, seed=0, size=(8, 8))
    karras = a1111_parse(infotext("x", steps=25, sampler="dpmpp_2m_karras", guidance=7, seed=0, size=(8, 8)))
    assert karras["Sampler"] == "DPM++ 2M Karras"        # A1111's name before its separate "Schedule type"


def test_sample_png_carries_its_parameters(pipeline, tmp_path, capsys):
    unet = load_base(pipeline).unet
    add_lora(unet, LoraSpec(rank=2, alpha=2, targets="attn"))
    lora = tmp_path / "my-style.safetensors"
    save_lora(unet, lora)
    grid = tmp_path / "grid.png"
    code, _, err = run(["sample", "--base", pipeline, "--lora", f"{lora}:0.8", "--prompt", "a red, shape",
                        "--prompt", "second", "--seed", "3", "--steps", "2", "--guidance", "4",
                        "--compare", "-o", grid], capsys)
    assert code == 0, err
    got = a1111_parse(Image.open(grid).info[PARAMETERS])
    raw = lora.read_bytes()
    tensors_sha = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    # the first cell: the first prompt and seed, in the --compare column (the base: LoRA weight 0)
    assert got["Prompt"] == "a red, shape"
    assert (got["Steps"], got["Sampler"], got["CFG scale"], got["Seed"]) == ("2", "DDIM", "4", "3")
    assert got["Model"] == pipeline.name and "Model hash" not in got           # a folder has no file hash
    assert "Lora hashes" not in got
    code, _, err = run(["sample", "--base", pipeline, "--lora", f"{lora}:0.8", "--prompt", "a red, shape",
                        "--seed", "3", "--steps", "2", "-o", grid], capsys)
    got = a1111_parse(Image.open(grid).info[PARAMETERS])
    assert got["Prompt"] == "a red, shape <lora:my-style:0.8>"
    assert got["Lora hashes"] == f"my-style: {tensors_sha[:12]}"
    w, h = Image.open(grid).size
    assert int(got["Size-1"]) <= w and int(got["Size-2"]) <= h
