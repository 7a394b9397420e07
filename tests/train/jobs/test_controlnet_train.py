"""ControlNet training end to end on a tiny pipeline whose VAE downsamples 8x (as SD's; the hint
encoder needs it): the exported folder loads in diffusers and steers its U-Net; hints pair by path or
name and are cropped exactly like their targets; resume == uninterrupted; the zero convs' gradient
onsets are what the health check expects; NaN, dead tensors and signals stop the run cleanly."""
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import adapterkit.train.jobs.controlnet as ct
from adapterkit.adapters.controlnet import ControlNet, HintSpec, hint_widths_for
from adapterkit.adapters.controlnet_files import load_controlnet
from adapterkit.train.config import ConfigError, load_config
from adapterkit.train.data.canny import edge_map_tensor, write_png
from adapterkit.train.data.folder import DataConfig
from adapterkit.train.data.pairs import HintSource, PairedFolder
from adapterkit.train.images import tensor_to_pil
from adapterkit.train.jobs.controlnet import ControlNetRecipe, gradient_onset, main
from adapterkit.train.jobs.guards import TrainingDiverged, TrainingInterrupted
from adapterkit.train.pipeline.base import load_base
from adapterkit.unet import PRESETS
from support import REPO
from support.fixtures import alias
from support.pictures import shape_image
from support.pipelines import build_tiny_pipeline
from support.recipes import CONFIGS
from support.recipes import controlnet_recipe as recipe

pipeline = alias("pipeline", "controlnet_pipeline")
images = alias("images", "controlnet_images")

def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def state(out: Path) -> dict:
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    return load_file(str(ckpt / "adapter_state.safetensors"))


def test_trains_a_controlnet_that_loads_in_diffusers_and_steers_its_unet(pipeline, images, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors import safe_open

    out = main(recipe(pipeline, images, tmp_path / "run", **{
        "output.formats": "diffusers,diffusers-file", "control.control_lora_rank": 4,
        "sample.prompts": "a red shape", "sample.steps": 2, "sample.num_hints": 1}))
    folder = out / "controlnet"
    assert (folder / "config.json").is_file() and (out / "controlnet.safetensors").is_file()
    assert [r["step"] for r in rows(out / "loss.jsonl")] == [1, 2, 3, 4]
    assert (out / "loss.png").is_file() and (out / "samples" / "final.png").is_file()
    assert (out / "checkpoints" / "step-000002" / "controlnet" / "config.json").is_file()

    # the preprocessing contract and the base travel in the file; the recipe too, without full paths
    cn = load_controlnet(folder)
    assert cn.hint == HintSpec("canny", "like-target", 100, 200)
    from adapterkit.train.pipeline.base import load_base
    assert cn.base_fingerprint == load_base(pipeline).fingerprint.unet
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        recipe_meta = json.loads(f.metadata()[ct.RECIPE_KEY])
    assert recipe_meta["data"]["root"] == images.name and recipe_meta["train"]["steps"] == 4
    single = load_controlnet(out / "controlnet.safetensors").state_dict()
    assert all(torch.equal(v, single[k]) for k, v in cn.state_dict().items())

    # diffusers: the folder loads, gives our residuals, and they change its U-Net's output
    theirs = ControlNetModel.from_pretrained(folder).eval()
    d_unet = UNet2DConditionModel.from_pretrained(pipeline / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, PRESETS["tiny"].context_dim, generator=g)
    hint = (torch.rand(1, 3, 64, 64, generator=g) > 0.9).float()          # an edge-like map in {0, 1}
    with torch.no_grad():
        down, mid = theirs(x, 500, ctx, hint, return_dict=False)
        ours = cn(x, 500, ctx, hint)
        plain = d_unet(x, 500, ctx).sample
        steered = d_unet(x, 500, ctx, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
    for a, b in zip([*ours.down, ours.mid], [*down, mid]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (steered - plain).abs().max() > 1e-4

    # the Control-LoRA export and the edge fidelity of the samples, in the JSONL and TensorBoard
    assert (out / "controlnet.control-lora.safetensors").stat().st_size < \
        (out / "controlnet.safetensors").stat().st_size / 2
    scores = rows(out / "edge_fidelity.jsonl")
    assert [r["step"] for r in scores] == [4]
    assert set(scores[0]["edge_f1"]) == {"0", "1"} and all(0 <= v <= 1 for v in scores[0]["edge_f1"].values())
    events = b"".join(p.read_bytes() for p in (out / "tensorboard").rglob("events.out.tfevents.*"))
    assert b"edge_f1/control_x1" in events and b"loss" in events


def test_hints_pair_by_path_or_name_and_the_rest_is_reported(images, tmp_path):
    cond = tmp_path / "cond"
    (cond / "sub").mkdir(parents=True)
    for i in range(12):
        edges = Image.fromarray(np.asarray(edge_map_tensor(shape_image(i, (96, 64) if i == 11 else (64, 64)))
                                           .permute(1, 2, 0).mul(255).byte()))
        if i == 0:
            edges.save(cond / "sub" / "img00.jpg")                 # by name, another extension and folder
        elif i == 3:
            continue                                               # missing
        elif i == 5:
            edges.save(cond / "img05.png")
            edges.save(cond / "img05.bmp")                         # one path, two files: ambiguous
        elif i == 7:
            edges.resize((32, 32)).save(cond / "img07.png")        # half size: resized before the crop
        else:
            write_png(edges, cond / f"img{i:02d}.png", text={"adapterkit.canny": json.dumps(
                {"low": 100, "high": 200, "blur": None})})
    Image.new("RGB", (64, 64)).save(cond / "stray.png")             # no image uses it; blank too
    data = DataConfig(root=str(images), resolution=64, bucket_step=16, min_side=32)
    ds = PairedFolder.scan(data, HintSource(folder=str(cond)))
    assert len(ds) == 10
    found = {k: [rel for rel, _ in v] for k, v in ds.pairs.entries.items()}
    assert found == {"missing": ["img03.png"], "ambiguous": ["img05.png"], "resized": ["img07.png"],
                     "orphan": ["stray.png"]}
    summary = ds.summary()
    assert "10 of 12 images paired" in summary and "img03.png" in summary and "img05.bmp" in summary
    # the JPEG found by name is img00's hint; mixed settings (one JPEG, one resized PNG): none recorded
    i = next(i for i, r in enumerate(ds.records) if r.rel == "img00.png")
    assert (ds[i]["hint"] - edge_map_tensor(shape_image(0))).abs().mean() < 0.05
    assert ds.hint_spec == HintSpec("canny", "like-target")

    # a folder made by `adapterkit canny` pairs completely and its thresholds go into the contract
    from adapterkit.train.data.canny import canny_folder
    canny_folder(images, tmp_path / "made", low=50, high=150)
    made = PairedFolder.scan(data, HintSource(folder=str(tmp_path / "made")))
    assert len(made) == 12 and not made.pairs.entries
    assert made.hint_spec == HintSpec("canny", "like-target", 50, 150)

    with pytest.raises(ValueError, match="none of the 12 training images has a usable conditioning image"):
        PairedFolder.scan(data, HintSource(folder=str(_empty(tmp_path / "other"))))
    with pytest.raises(ValueError, match="overlap"):
        PairedFolder.scan(data, HintSource(folder=str(images)))


def _empty(folder: Path) -> Path:
    folder.mkdir()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(folder / "unrelated.png")
    return folder


def test_the_hint_is_cropped_exactly_like_its_target(tmp_path):
    """A 150x100 image in an 80x48 bucket, random crops and flips: the conditioning image (the very
    same pixels) comes out identical to the target; an automatic Canny map is the Canny of the crop."""
    root, cond = tmp_path / "images", tmp_path / "cond"
    root.mkdir()
    cond.mkdir()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8))
    ImageDraw.Draw(image).rectangle((20, 20, 90, 70), fill=(250, 250, 250))
    image.save(root / "a.png")
    (root / "a.txt").write_text("noise")
    image.save(cond / "a.png")
    data = DataConfig(root=str(root), resolution=64, bucket_step=16, min_side=32, random_crop=True, flip=True)
    paired = PairedFolder.scan(data, HintSource(folder=str(cond)))
    auto = PairedFolder.scan(data, HintSource(canny_low=50, canny_high=150))
    assert paired.bucket_of[0] == (80, 48)
    crops = []
    for epoch in range(8):
        s, a = paired[(epoch, 0)], auto[(epoch, 0)]
        crops.append(s["crop"])
        assert s["hint"].shape == s["pixel_values"].shape == (3, 48, 80)
        torch.testing.assert_close(s["hint"] * 2 - 1, s["pixel_values"], atol=1e-6, rtol=0)
        assert torch.equal(paired.hint((epoch, 0)), s["hint"])              # what train_step uses
        target = tensor_to_pil(a["pixel_values"])                           # the cropped target itself
        assert torch.equal(a["hint"], edge_map_tensor(target, 50, 150))
        assert torch.equal(auto.hint((epoch, 0), a["crop"]), a["hint"])
    assert {c.flip for c in crops} == {True, False} and len({c.box for c in crops}) == 8


def test_hints_are_cached_in_memory_exactly_and_within_their_budget(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name, box in (("a", (10, 12, 50, 44)), ("b", (8, 20, 40, 56))):
        image = Image.new("RGB", (64, 64), (20, 40, 200))
        ImageDraw.Draw(image).ellipse(box, fill=(240, 220, 40))
        image.save(root / f"{name}.png")
    data = DataConfig(root=str(root), resolution=64, bucket_step=64, min_side=32, trigger="sks")
    cached = PairedFolder.scan(data, HintSource())
    uncached = PairedFolder.scan(data, HintSource(cache_mb=0))
    first = cached.hint(0)
    assert torch.equal(first, uncached.hint(0)) and first.any()
    (root / "a.png").unlink()                              # a cached hint needs no file
    assert torch.equal(cached.hint(0), first)
    with pytest.raises(ValueError, match=r"a\.png was removed or cannot be read since the folder"):
        uncached.hint(0)
    assert len(cached._hints) == 2 and not uncached._hints   # both images' hints, from the scan's check


@pytest.mark.parametrize("over", [{"train.grad_accum": 2}, {"control.train_rank": 2}],
                         ids=["full", "low-rank"])
def test_resume_after_a_crash_equals_the_uninterrupted_run(pipeline, images, tmp_path, monkeypatch, over):
    straight = main(recipe(pipeline, images, tmp_path / "straight", **over))
    real_step, calls = ct.train_step, []

    def crash_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:                      # steps 1-2 done and step 2's checkpoint written
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ct, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(recipe(pipeline, images, tmp_path / "resumed", **over))
    monkeypatch.setattr(ct, "train_step", real_step)
    resumed = main(recipe(pipeline, images, tmp_path / "resumed", **over))

    a, b = state(straight), state(resumed)
    assert a.keys() == b.keys()
    if "control.train_rank" not in over:        # the full ControlNet: every tensor is trained
        assert len(a) == len(load_controlnet(straight / "controlnet").state_dict())
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [r["step"] for r in rows(resumed / "loss.jsonl")] == [1, 2, 3, 4]
    for x, y in zip(rows(straight / "loss.jsonl"), rows(resumed / "loss.jsonl")):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)


def test_gradients_arrive_where_the_zero_convs_let_them(pipeline, images, tmp_path, monkeypatch):
    """Step 1: only the zero convs; step 2: + the encoder clone and the hint conv_out; step 3: all
    (gradient_onset). Everything else is exactly zero until then."""
    real, seen = ct.check_controlnet_gradients, []

    def record(cn, step, hinted):
        seen.append({n for n, p in cn.named_parameters() if p.grad is not None and p.grad.any()})
        real(cn, step, hinted)

    monkeypatch.setattr(ct, "check_controlnet_gradients", record)
    main(recipe(pipeline, images, tmp_path / "run", **{"train.steps": 3, "output.checkpoint_every": 0}))
    from adapterkit.adapters.controlnet import ControlNet
    with torch.device("meta"):
        names = [n for n, _ in ControlNet(PRESETS["tiny"]).named_parameters()]
    for step, nonzero in enumerate(seen, start=1):
        assert nonzero == {n for n in names if gradient_onset(n) <= step}, step
    assert {gradient_onset(n) for n in names} == {1, 2, 3}


def test_a_controlnet_tensor_without_gradient_stops_the_run(pipeline, images, tmp_path, monkeypatch):
    real = ct.ControlNet.from_unet

    def with_a_bypassed_zero_conv(unet, *args, **kwargs):
        cn = real(unet, *args, **kwargs)
        cn.controlnet_down_blocks[2].forward = lambda x: torch.zeros_like(x)   # its weights never used
        return cn

    monkeypatch.setattr(ct.ControlNet, "from_unet", staticmethod(with_a_bypassed_zero_conv))
    with pytest.raises(RuntimeError, match=r"got no gradient at step 1.*controlnet_down_blocks\.2\.weight"):
        main(recipe(pipeline, images, tmp_path / "run"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_control_lora_training_moves_the_encoder_by_a_low_rank_difference(pipeline, images, tmp_path,
                                                                          monkeypatch, dtype):
    """control.train_rank: the optimizer holds the factors, the encoder's 1-D tensors and the added
    layers; each exported encoder weight differs from the base by rank <= r (bf16: computed from the
    fp32 base and the fp32 masters); the Control-LoRA file is that difference without loss; gradients
    reach the factors when `gradient_onset` says."""
    from adapterkit.adapters.control_lora import load_control_lora
    from adapterkit.adapters.controlnet import base_encoder_state

    real, seen = ct.check_controlnet_gradients, []

    def record(cn, step, hinted):
        seen.append(({n for n, p in cn.named_parameters() if p.grad is not None and p.grad.any()},
                     {n for n, p in cn.named_parameters() if p.requires_grad}))
        real(cn, step, hinted)

    monkeypatch.setattr(ct, "check_controlnet_gradients", record)
    out = main(recipe(pipeline, images, tmp_path / "run", **{"control.train_rank": 2, "model.dtype": dtype}))
    for step, (nonzero, trainable) in enumerate(seen[:3], start=1):
        assert nonzero == {n for n in trainable if gradient_onset(n) <= step}, step
    assert any(n.endswith(".down") for n in seen[0][1]) and not any("original" in n for n in seen[0][1])

    trained = state(out)
    full = load_controlnet(out / "controlnet").state_dict()
    assert sum(t.numel() for t in trained.values()) < sum(t.numel() for t in full.values()) / 2
    unet = load_base(pipeline).unet
    base = base_encoder_state(unet)
    moved = 0
    for key, w in full.items():
        if key in base and w.ndim >= 2:
            s = torch.linalg.svdvals((w - base[key]).flatten(1))
            assert (s[2:] <= 1e-5 * s[0] + 1e-7).all(), key
            moved += bool(s[0] > 0)
    assert moved == sum(1 for k, w in full.items() if k in base and w.ndim >= 2)
    from_file = load_control_lora(out / "controlnet.control-lora.safetensors", unet).state_dict()
    assert max((from_file[k] - w).abs().max().item() for k, w in full.items()) <= 1e-5


def test_a_base_whose_vae_is_2x_gets_a_hint_encoder_that_downsamples_2x(images, tmp_path):
    two_x = build_tiny_pipeline(tmp_path / "base", PRESETS["tiny"])       # the shared fixture's 2x VAE
    out = main(recipe(two_x, images, tmp_path / "run", **{"train.steps": 1, "sample.prompts": "[]"}))
    config = json.loads((out / "controlnet" / "config.json").read_text())
    assert config["conditioning_embedding_out_channels"] == [16, 32]     # one stride-2 conv


def test_a_controlnet_whose_hint_encoder_does_not_fit_the_base_is_refused(pipeline):
    base = load_base(pipeline)
    cn = ControlNet.from_unet(base.unet, hint_widths=hint_widths_for(2))
    with pytest.raises(ValueError, match=r"8x smaller .* downsamples 2x.*widths \[16, 32, 96, 256\]"):
        ct.check_controlnet(base, cn)                   # train.generate's, which main calls


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(pipeline, images, tmp_path, monkeypatch):
    real_loss, calls = ct.diffusion_loss, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(ct, "diffusion_loss", nan_at_step_3)
    with pytest.raises(TrainingDiverged, match=r"became nan at step 3.*step-000002"):
        main(recipe(pipeline, images, tmp_path / "run", **{"output.checkpoint_every": 1}))
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000001", "step-000002"]
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    assert not (tmp_path / "run" / "controlnet").exists()


def test_sigint_writes_a_final_checkpoint_and_the_run_resumes_from_it(pipeline, images, tmp_path,
                                                                      monkeypatch):
    real_step, calls = ct.train_step, []

    def interrupt_during_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)          # as Ctrl-C would, mid-step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ct, "train_step", interrupt_during_step_2)
    cfg = recipe(pipeline, images, tmp_path / "run", **{"output.checkpoint_every": 0, "train.steps": 3})
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 2") as stopped:
        main(cfg)
    assert stopped.value.exit_code == 130
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "controlnet" / "config.json").is_file()
    assert not (tmp_path / "run" / "controlnet").exists()
    monkeypatch.setattr(ct, "train_step", real_step)
    main(cfg)
    assert (tmp_path / "run" / "controlnet" / "config.json").is_file()
    assert [r["step"] for r in rows(tmp_path / "run" / "loss.jsonl")] == [1, 2, 3]


def test_trains_against_a_loraed_base_and_samples_lora_by_control_scales(pipeline, images, tmp_path):
    from adapterkit.adapters.lora import LoraSpec, add_lora
    from adapterkit.adapters.lora_files import save_lora
    from adapterkit.unet import load_unet
    unet = load_unet(pipeline / "unet")
    add_lora(unet, LoraSpec(rank=2, alpha=2, targets="attn"))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_lora(unet, tmp_path / "style.safetensors")
    hint = tmp_path / "hint.png"
    tensor_to_pil(edge_map_tensor(shape_image(1)), (0.0, 1.0)).save(hint)

    one_step = {"train.steps": 1, "output.checkpoint_every": 0}
    plain = main(recipe(pipeline, images, tmp_path / "plain", **one_step))
    out = main(recipe(pipeline, images, tmp_path / "lora", **one_step, **{
        "control.lora": f"{tmp_path / 'style.safetensors'}:0.8", "sample.prompts": "a shape",
        "sample.hints": str(hint), "sample.steps": 2, "sample.lora_scales": "0,1",
        "sample.control_scales": "0,0.5,1"}))
    assert rows(plain / "loss.jsonl")[0]["loss"] != rows(out / "loss.jsonl")[0]["loss"]   # the LoRA acts
    grid = Image.open(out / "samples" / "final.png")
    assert grid.width > 4 * 64 and 2 * 64 < grid.height < 3 * 64       # 2 rows (LoRA x0, x1) x 4 columns
    # A1111's infotext of the first sample (LoRA x0, control x0; train/infotext.py): in its PNG chunk
    params = grid.info["parameters"]
    assert params.startswith("a shape\n") and "ControlNet: controlnet, Control scale: 0" in params
    assert "Steps: 2, Sampler: DDIM" in params and "Size: 64x64" in params
    assert set(rows(out / "edge_fidelity.jsonl")[0]["edge_f1"]) == {"0", "0.5", "1"}
    # the file is made for the base: the LoRA was looked through
    assert load_controlnet(out / "controlnet").base_fingerprint == \
        load_controlnet(plain / "controlnet").base_fingerprint


def test_bf16_base_with_fp32_masters_or_an_fp32_controlnet(pipeline, images, tmp_path):
    for compute in ("base", "fp32"):
        out = main(recipe(pipeline, images, tmp_path / compute, **{
            "model.dtype": "bf16", "train.adapter_compute": compute, "train.steps": 2}))
        trained = state(out)
        assert all(v.dtype == torch.float32 for v in trained.values())
        exported = load_controlnet(out / "controlnet").state_dict()
        assert all(torch.equal(exported[k], trained[k]) for k in trained)    # the fp32 values, not bf16
        moved = trained["controlnet_mid_block.weight"]
        assert moved.any() and not torch.equal(moved, moved.bfloat16().float())


def test_cli_trains_from_yaml_with_overrides_and_the_shipped_recipe_loads(pipeline, images, tmp_path, capsys):
    import yaml

    from adapterkit.train.cli.main import main as cli
    cfg = tmp_path / "controlnet.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"base": str(pipeline)},
                                   "data": {"root": str(images), "resolution": 64, "bucket_step": 16,
                                            "min_side": 32},
                                   "train": {"steps": 1, "batch_size": 4}}))
    out = tmp_path / "cli"
    assert cli(["train", "controlnet", str(cfg), f"output.dir={out}", "output.name=edges",
                "control.conditioning_scale=0.5", "output.formats=diffusers-file"]) == 0
    assert (out / "edges.safetensors").is_file()
    assert cli(["train", "controlnet", str(cfg), "control.canny_lo=50"]) == 2
    assert "did you mean 'canny_low'" in capsys.readouterr().err

    shipped = load_config(CONFIGS / "sd15_controlnet.yaml", ControlNetRecipe,
                          [f"model.base={tmp_path}", f"data.root={tmp_path}"])
    assert shipped.control.kind == "canny" and shipped.train.steps > 0
    with pytest.raises(ConfigError, match="did you mean 'conditioning_scale'"):
        load_config(CONFIGS / "sd15_controlnet.yaml", ControlNetRecipe, ["control.conditioning_scal=1"])


PROBE = '''"""`adapterkit train` under a probe: records, per process, the dataset keys each step trained on
and the ControlNet's weights at the end, then exits with the CLI's code."""
import json, os, sys
from pathlib import Path

from safetensors.torch import save_file

import adapterkit.train.jobs.controlnet as ct
from adapterkit.train.cli.main import main

probe, rank = Path(os.environ["PROBE_DIR"]), int(os.environ["RANK"])
seen, nets = [], []
real_step = ct.train_step


def train_step(cfg, accelerator, model, cn, base, cache, dataset, plan, schedule, step, *rest, **kw):
    seen.append([list(k) for m in range(cfg.train.grad_accum) for k in plan.keys(step, m)])
    nets.append(cn)
    return real_step(cfg, accelerator, model, cn, base, cache, dataset, plan, schedule, step, *rest, **kw)


ct.train_step = train_step
code = main(sys.argv[1:])
(probe / f"keys-{rank}.json").write_text(json.dumps(seen))
save_file({k: v.detach().cpu().contiguous() for k, v in nets[-1].state_dict().items()},
          str(probe / f"weights-{rank}.safetensors"))
sys.exit(code)
'''


def test_two_processes_with_accelerate_launch_train_one_controlnet(pipeline, images, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU machine (two gloo processes), as
    LoRA training's test: each process trains on its own images, DDP keeps the two copies equal, and
    the main process alone writes the checkpoints, loss.jsonl and one exported ControlNet."""
    import socket
    import subprocess
    import sys

    import yaml
    cfg, out, probe = tmp_path / "controlnet.yaml", tmp_path / "ddp", tmp_path / "probe"
    probe.mkdir()
    (tmp_path / "probe.py").write_text(PROBE)
    cfg.write_text(yaml.safe_dump({"model": {"base": str(pipeline)},
                                   "data": {"root": str(images), "resolution": 64, "bucket_step": 16,
                                            "min_side": 32},
                                   "train": {"steps": 2, "batch_size": 2},
                                   "output": {"dir": str(out), "checkpoint_every": 1,
                                              "formats": ["diffusers"]}}))
    with socket.socket() as s:                   # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PROBE_DIR": str(probe),
                        "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", "--main_process_port", str(port),
                          str(tmp_path / "probe.py"), "train", "controlnet", str(cfg)],
                         cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done:") == 2                      # both processes finished

    # the main process alone wrote: one checkpoint a step, one loss row a step, one ControlNet
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000001", "step-000002"]
    last = out / "checkpoints" / "step-000002"
    assert json.loads((last / "trainer_state.json").read_text())["processes"] == 2
    assert [r["step"] for r in rows(out / "loss.jsonl")] == [1, 2]
    exported = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                      if p.is_file() and "checkpoints" not in p.parts and "cache" not in p.parts
                      and "tensorboard" not in p.parts)
    assert exported == ["controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors",
                        "edge_fidelity.jsonl", "loss.jsonl", "loss.png"], exported
    assert (out / "edge_fidelity.jsonl").read_text() == ""             # no sample prompts: no scores
    assert sorted(p.name for p in last.rglob("config.json")) == ["config.json"]  # one ControlNet in it

    # the two processes trained on different images (no image twice in this first epoch) ...
    keys = [json.loads((probe / f"keys-{r}.json").read_text()) for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 2 and all(keys[0]) and all(keys[1])
    every = [tuple(k) for r in keys for batch in r for k in batch]
    assert len(every) == len(set(every)) and {e for e, _ in every} == {0}
    # ... and ended with the very same weights: the exported ones, the last checkpoint's, trained ones
    final = [load_file(str(probe / f"weights-{r}.safetensors")) for r in (0, 1)]
    folder = load_controlnet(out / "controlnet").state_dict()
    ckpt = state(out)
    assert folder.keys() == ckpt.keys() == final[0].keys() == final[1].keys()
    for k in folder:
        assert torch.equal(final[0][k], final[1][k]), k
        assert torch.equal(folder[k], ckpt[k]) and torch.equal(folder[k], final[0][k]), k
    assert (folder["controlnet_mid_block.weight"] != 0).any()          # zero at init: it trained


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_train_what_the_eager_step_trains(pipeline, images, tmp_path, monkeypatch, capsys):
    """On a GPU the job replays its steps from CUDA graphs (train.graphs, ControlledUNet): the same
    losses and ControlNet as without them."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)       # fp32, no TF32: sums' order only
    # eps = 1 makes AdamW's step ~ lr * gradient (see the LoRA job's test of the same name).
    over = {"train.steps": 4, "optim.lr": 1.0, "optim.eps": 1.0, "optim.weight_decay": 0.0,
            "sample.prompts": "[]", "data.caption_dropout": 0.0, "model.dtype": "fp32"}
    graphed = main(recipe(pipeline, images, tmp_path / "graphs", **over, **{"train.cuda_graphs": True}))
    assert "CUDA graphs: on" in capsys.readouterr().out
    eager = main(recipe(pipeline, images, tmp_path / "eager", **over, **{"train.cuda_graphs": False}))
    assert [r["loss"] for r in rows(graphed / "loss.jsonl")] == pytest.approx(
        [r["loss"] for r in rows(eager / "loss.jsonl")], rel=1e-4)
    a, b = state(graphed), state(eager)
    assert max((a[k] - b[k]).abs().max().item() / (b[k].abs().max().item() + 1e-6) for k in a) <= 1e-4


def test_edge_fidelity_is_logged_at_every_sample_step_during_training(pipeline, images, tmp_path):
    out = main(recipe(pipeline, images, tmp_path / "run", **{
        "sample.every": 2, "sample.prompts": "a red shape", "sample.steps": 2, "sample.num_hints": 1,
        "sample.control_scales": "0.0,1.0", "output.checkpoint_every": 0}))
    scores = rows(out / "edge_fidelity.jsonl")
    assert [r["step"] for r in scores] == [2, 4]                       # step 2 during, step 4 the final
    assert (out / "samples" / "step-000002.png").is_file() and (out / "samples" / "final.png").is_file()
    events = b"".join(p.read_bytes() for p in (out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events.count(b"edge_f1/control_x1") >= 2
    assert events.count(b"samples") >= 2                               # both grids, as images


def test_sample_command_steers_with_a_controlnet_and_its_hint(pipeline, tmp_path):
    """`adapterkit sample --controlnet --hint`: the ControlNet changes the picture, at control scale 0
    the picture is the base's exactly, --guess-mode changes it again (its oracle is in
    test_controlnet_pipeline.py), a second ControlNet at scale 0 changes nothing, and a hint or guess
    mode without a ControlNet, 3 scales for 2 ControlNets or a missing ControlNet are refused."""
    from adapterkit.adapters.controlnet_files import save_controlnet
    from adapterkit.train.cli.main import main as cli
    from support.unets import controlnet_for

    save_controlnet(controlnet_for(load_base(pipeline), zero=False), tmp_path / "cn")
    hint = tmp_path / "edges.png"
    Image.fromarray(((np.indices((80, 96)).sum(0) // 8) % 2 * 255).astype(np.uint8)).convert("RGB").save(hint)
    common = ["sample", "--base", str(pipeline), "--prompt", "a red shape", "--steps", "2", "--size", "64"]

    from support.cli import drawn_grids
    drawn = {}

    def grid(name, *extra):
        """The sampled picture (the grid's last cell, 8-bit) of one `sample` run."""
        with drawn_grids() as grids:
            assert cli([*common, *extra, "-o", str(tmp_path / name)]) == 0
        drawn.update(grids[-1])
        return drawn["cells"][-1]
    plain = grid("plain.png")
    steered = grid("steered.png", "--controlnet", str(tmp_path / "cn"), "--hint", str(hint))
    # the grid shows the hint the ControlNet got, names the column honestly, and says the settings
    assert drawn["cols"] == 2 and drawn["col_labels"] == ["hint", "base + ControlNet 1"]
    assert "ControlNet cn" in drawn["footer"]
    assert "2 steps" in drawn["footer"] and "a red shape / seed 0" in drawn["row_labels"][0]
    off = grid("off.png", "--controlnet", str(tmp_path / "cn"), "--hint", str(hint), "--control-scale", "0")
    assert plain.shape == steered.shape and np.abs(plain.astype(int) - steered).max() > 0
    assert np.array_equal(plain, off)
    guessed = grid("guess.png", "--controlnet", str(tmp_path / "cn"), "--hint", str(hint), "--guess-mode")
    assert np.abs(guessed.astype(int) - steered).max() > 0
    # two ControlNets: the second at scale 0 leaves the first's picture exactly; at 1 it changes it
    save_controlnet(controlnet_for(load_base(pipeline), seed=1, zero=False), tmp_path / "cn2")
    two = ["--controlnet", str(tmp_path / "cn"), "--hint", str(hint), "--controlnet", str(tmp_path / "cn2"),
           "--hint", str(hint)]
    assert np.array_equal(grid("two-off.png", *two, "--control-scale", "1", "--control-scale", "0"), steered)
    assert np.abs(grid("two.png", *two).astype(int) - steered).max() > 0
    three_scales = [*two, *["--control-scale", "1"] * 3]
    for bad in (["--hint", str(hint)], ["--guess-mode"], three_scales,
                ["--controlnet", str(tmp_path / "nope"), "--hint", str(hint)]):
        assert cli([*common, *bad, "-o", str(tmp_path / "x.png")]) == 2, bad
    assert not (tmp_path / "x.png").exists()
