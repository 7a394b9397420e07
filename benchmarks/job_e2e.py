"""A training job end to end beside its step, in one call (issue 21 items 1 and 3): how much of the
step benchmark's speed a user running `adapterkit train lora` (or `train controlnet`, `--job
controlnet`) gets, and where the warm-up goes.

It builds, offline and from random weights, an SD1.5-sized pipeline folder (our U-Net from
PRESETS["sd15"] in unet/, the KL-f8 VAE and the CLIP-L text tower from configs/base/sd1/, the tiny
pretrain job's character-level CLIP tokenizer, 77 tokens a prompt, configs/schedulers/sd1.json) and
a folder of `--pictures` JPEGs with captions in five aspect ratios around 512 px (one bucket each;
`--buckets` takes fewer: the job's CUDA graphs cover at most four input shapes, train/jobs/graphs.py
GraphedStep.max_graphs, and run the others eager; "graphs" in the JSON says so). Then it runs the
real job on them, configs/sd15_lora.yaml with only what a benchmark must set overridden (steps,
batch size, checkpoint_every 0, no samples, data.resolution, model.base/data.root/output.dir, the
LoRA targets, and data.min_side where the pictures are smaller than 64 px), and
benchmarks/lora_step.py's step on the same batch, latent size and LoRA targets
(`ours-bf16-lora-graphs`, the job's step: bf16 base and adapter, fp32 masters, CUDA graphs).

`--job controlnet`: configs/sd15_controlnet.yaml on the same pictures, the Canny hints made on the fly
from them (control.folder null, the recipe's default), batch 8 without accumulation
(train.grad_accum=1, so that a step is the step benchmark's), beside benchmarks/controlnet_step.py's
`ours-bf16-cn-graphs` (the job's ControlledUNet through GraphedStep) at the same batch and size.

Measured, into `--json`:
- job_img_s: steady images/s from the job's own loss.jsonl (train/jobs/progress.py LossLog: "seconds"
  since the loop began, per step), batch * steps / time over the steps after the warm-up, which is
  the first max(3, 10%) steps (every bucket is met, and captured, in epoch 0: ten steps at the
  defaults); per_step_img_s: p10/p50/p90 of batch / (time of one step) over the same steps.
- first_step_s: "seconds" at step 1 (the first capture of CUDA graphs included).
- cache_build_s: from the job's "data: ..." summary line (printed after the scan, right before
  LatentCache.build) to the cache's "latent cache ...: ... encoded now" log line; the job runs through
  adapterkit/__main__.py as `python -m adapterkit` does, only with the `adapterkit` loggers at INFO.
- wall_s: the job process from start to exit (imports, loading, scan, cache, loop, export).
- warmup: where the time before the steady state goes, from the job's own output lines: load_s
  (process start to the data summary: imports, the base, the folder scan), cache_build_s, setup_s
  (the cache's last line to the progress bar: adapter, optimizer, resume), first_step_s, and per CUDA
  graph capture (train/jobs/graphs.py says each: a new input shape's warm-up passes and capture) its
  seconds and the Triton kernels' compile share of them (unet/kernels.py compile_stats).
- step_img_s, job_vs_step = job_img_s / step_img_s (target: >= 0.95).

On the H200, one device call (diffusers and datasets come as wheels in .whl):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && \\
        PYTHONPATH=/tmp/site:$PWD python3 benchmarks/job_e2e.py --json $OUT/job_e2e.json
    ... python3 benchmarks/job_e2e.py --job controlnet --json $OUT/job_e2e_controlnet.json
CPU smoke (tiny U-Net, a 2x VAE and a one-layer text encoder; < 60 s on 2 cores):
    python3 benchmarks/job_e2e.py --preset tiny --size 64 --pictures 12 --steps 4 --batch 2 --device cpu
    python3 benchmarks/job_e2e.py --job controlnet --preset tiny --size 64 --pictures 12 --steps 4 \
        --batch 2 --device cpu
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from adapterkit.unet import PRESETS, UNet, save_unet  # noqa: E402

RECIPES = {"lora": REPO / "configs" / "sd15_lora.yaml",
           "controlnet": REPO / "configs" / "sd15_controlnet.yaml"}
BATCH = {"lora": 32, "controlnet": 8}                   # the step benchmarks' batches
# `--preset sdxl` (or sdxl-tiny, a CPU smoke): an SDXL-sized pipeline (benchmarks/sdxl_base.py), 1024 px
# pictures, configs/sdxl_lora.yaml (the 12 GB recipe: gradient checkpointing, so no CUDA graphs) at its
# batch of 4, beside lora_step.py's SDXL step with checkpointing.
SDXL_RECIPE, SDXL_BATCH = REPO / "configs" / "sdxl_lora.yaml", 4
SHAPES = ((512, 512), (576, 448), (448, 576), (640, 384), (384, 640))     # (w, h) at 512 px, a bucket each
PATH_KEYS = ("model.base", "data.root", "output.dir")     # overrides left out of the JSON: this machine's
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
# The job's entry point (adapterkit/__main__.py) with our loggers at INFO: the cache build's log lines
# then reach stdout, where they are timed.
JOB_BOOT = ("import logging, runpy, sys; h = logging.StreamHandler(sys.stdout); "
            "h.setFormatter(logging.Formatter('%(name)s: %(message)s')); "
            "log = logging.getLogger('adapterkit'); log.addHandler(h); log.setLevel(logging.INFO); "
            "sys.argv[0] = 'adapterkit'; "
            "runpy.run_module('adapterkit', run_name='__main__', alter_sys=True)")


# --- the base pipeline -------------------------------------------------------------------------------

def part_configs(preset: str) -> tuple[dict, dict]:
    """(VAE config, CLIP text config) for `preset`: SD1.x's own for sd15; for any other preset the same
    shapes shrunk (a 2x VAE of 8/16 channels, a one-layer text encoder of the U-Net's context width)."""
    vae = json.loads((REPO / "configs/base/sd1/vae/config.json").read_text())
    text = json.loads((REPO / "configs/base/sd1/text_encoder/config.json").read_text())
    if preset != "sd15":
        width = PRESETS[preset].context_dim
        vae |= {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 8,
                "sample_size": 64}
        text |= {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "projection_dim": width}
    return ({k: v for k, v in vae.items() if not k.startswith("_")},
            {k: v for k, v in text.items() if not k.startswith("_")})


def build_pipeline(folder: Path, preset: str, seed: int = 0) -> Path:
    """A diffusers StableDiffusionPipeline folder of random weights under `folder`, loadable by
    train.pipeline.base.load_base. The U-Net: PyTorch's default init plus N(0, 0.02) noise (as
    tests/support/unets.random_unet), saved in fp16 as SD1.5's own folders are."""
    import diffusers
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from adapterkit.train.jobs.pretrain import make_tokenizer

    torch.manual_seed(seed)
    unet = UNet(PRESETS[preset])
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_unet(unet, folder / "unet", dtype=torch.float16)
    del unet
    vae_cfg, text_cfg = part_configs(preset)
    AutoencoderKL(**vae_cfg).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**text_cfg)).save_pretrained(folder / "text_encoder")
    make_tokenizer().save_pretrained(folder / "tokenizer")        # in the files this transformers reads
    (folder / "scheduler").mkdir()
    shutil.copy(REPO / "configs" / "schedulers" / "sd1.json", folder / "scheduler" / "scheduler_config.json")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def latent_scale(preset: str) -> int:
    """Pixels per latent pixel of the VAE the benchmark builds for `preset`."""
    if is_sdxl(preset):
        from benchmarks.lora_step import BENCH_PRESETS
        from benchmarks.sdxl_base import part_configs as sdxl_part_configs
        vae = sdxl_part_configs(preset if preset in PRESETS else BENCH_PRESETS[preset])[0]
    else:
        vae = part_configs(preset)[0]
    return 2 ** (len(vae["block_out_channels"]) - 1)


# --- the pictures ------------------------------------------------------------------------------------

def picture_sizes(size: int, shapes=SHAPES) -> list[tuple[int, int]]:
    """`shapes` (given at 512 px) scaled to `size` px, sides rounded to multiples of 8."""
    return [(8 * round(w * size / 512 / 8), 8 * round(h * size / 512 / 8)) for w, h in shapes]


def write_pictures(root: Path, count: int, sizes: list[tuple[int, int]],
                   seed: int = 0) -> list[tuple[int, int]]:
    """`count` JPEGs with same-name .txt captions under `root`, the sizes taken in turn: a smooth
    random colour field (a 3x4 grid of colours, bicubic-upsampled) with one random ellipse or box on
    it. Every file differs (the scan skips duplicates) and every caption too. Returns the sizes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        image = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        box = (x0, y0, x0 + int(rng.integers(w // 4, w // 2)), y0 + int(rng.integers(h // 4, h // 2)))
        colour, shape = int(rng.integers(len(COLOURS))), ("ellipse", "box")[i % 2]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (ImageDraw.Draw(image).ellipse if shape == "ellipse" else ImageDraw.Draw(image).rectangle)(box, fill)
        image.save(root / f"{i:04d}.jpg", quality=90)
        (root / f"{i:04d}.txt").write_text(f"picture {i}: a {COLOURS[colour]} {shape} on a soft colour field")
        written.append((w, h))
    return written


# --- the job and its log -----------------------------------------------------------------------------

def job_overrides(base: Path, pictures: Path, out: Path, steps: int, batch: int, size: int,
                  targets: str, min_side: int, job: str = "lora") -> list[str]:
    """The recipe keys a benchmark must set; everything else stays the job's configs/sd15_*.yaml."""
    overrides = [f"model.base={base}", f"data.root={pictures}", f"output.dir={out}", f"train.steps={steps}",
                 f"train.batch_size={batch}", "output.checkpoint_every=0", "sample.prompts=[]",
                 f"data.resolution={size}"]
    overrides += [f"lora.targets={targets}"] if job == "lora" else ["train.grad_accum=1"]
    return overrides + ([f"data.min_side={min_side}"] if min_side < 64 else [])   # 64: DataConfig's default


def run_job(overrides: list[str], device: str, log: Path,
            job: str = "lora", recipe: Path | None = None) -> tuple[float, list[tuple[float, str]]]:
    """Run the job; returns (wall seconds, its output lines stamped with seconds since start). Output
    lines end at \\n or \\r (universal newlines), so each progress-bar refresh is a line too."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""        # the job picks CUDA whenever it sees one
    cmd = [sys.executable, "-c", JOB_BOOT, "train", job, str(recipe or RECIPES[job]), *overrides]
    stamped, t0 = [], time.perf_counter()
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            stamped.append((time.perf_counter() - t0, line.rstrip("\n")))
            f.write(line)
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = "\n".join(text for _, text in stamped[-30:])
        raise RuntimeError(f"the job failed (exit {proc.returncode}); its output ({log}, kept with --work) "
                           f"ended:\n{tail}")
    return wall, stamped


def cache_build_seconds(stamped: list[tuple[float, str]]) -> float | None:
    """Seconds from the job's data summary ("data: ...", printed right before LatentCache.build) to
    the cache's closing log line ("... latent cache ...: ... encoded now"); None if either is missing."""
    start = next((t for t, line in stamped if re.search(r"data: \d+ of \d+ image files", line)), None)
    end = next((t for t, line in stamped if "latent cache " in line and "encoded now" in line), None)
    return None if start is None or end is None else end - start


CAPTURE = re.compile(r"CUDA graphs: captured input shape (\([^)]*\)) in ([\d.]+) s \(Triton kernels compiled "
                     r"or loaded in ([\d.]+) s")


def warmup_breakdown(stamped: list[tuple[float, str]], job: str) -> dict:
    """Where the time before the loop's steady state went, from the job's output lines (None where a
    line is missing): load_s, cache_build_s, setup_s, and each CUDA graph capture's shape, seconds and
    Triton share (`CAPTURE`)."""
    data = next((t for t, line in stamped if re.search(r"data: \d+ of \d+ image files", line)), None)
    cached = next((t for t, line in stamped if "latent cache " in line and "encoded now" in line), None)
    bar = next((t for t, line in stamped if line.lstrip().startswith(f"{job}:")), None)
    captures = [{"shape": m.group(1), "s": float(m.group(2)), "triton_s": float(m.group(3))}
                for _, line in stamped for m in [CAPTURE.search(line)] if m]
    return {"load_s": data, "cache_build_s": cache_build_seconds(stamped),
            "setup_s": None if cached is None or bar is None else bar - cached, "captures": captures,
            "captures_s": sum(c["s"] for c in captures), "triton_s": sum(c["triton_s"] for c in captures)}


def graph_lines(stamped: list[tuple[float, str]]) -> list[str]:
    """What the job said about CUDA graphs (on, off and why, shapes beyond its limit). A message
    printed while the progress bar is up follows the bar's text on its line."""
    return [line[line.index("CUDA graphs:"):] for _, line in stamped if "CUDA graphs:" in line]


def read_loss_log(path: Path) -> list[dict]:
    """The rows of a loss.jsonl, by step."""
    return sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()),
                  key=lambda r: r["step"])


def steady_rate(rows: list[dict], batch: int, warmup_fraction: float = 0.1, min_warmup: int = 3) -> dict:
    """Images/s over the steps after the warm-up (the first max(min_warmup, ceil(fraction * steps))),
    from LossLog rows ({"step", "seconds"}, seconds since the loop began, one row per step from 1).
    Returns img_s (batch x steps / their time), the per-step rates' p10/p50/p90, first_step_s,
    warmup_steps and the warm-up steps' own seconds."""
    steps = [r["step"] for r in rows]
    if steps != list(range(1, len(rows) + 1)):
        raise ValueError(f"loss.jsonl should hold steps 1..{len(rows)} once each, holds {steps[:5]}...")
    seconds = [0.0] + [float(r["seconds"]) for r in rows]           # seconds[s]: when step s ended
    warm = max(min_warmup, math.ceil(warmup_fraction * len(rows)))
    if len(rows) <= warm:
        raise ValueError(f"{len(rows)} steps leave none after the warm-up of {warm}; run more steps")
    durations = np.diff(seconds[warm:])                              # steps warm+1 .. last
    rates = batch / np.maximum(durations, 1e-9)
    p10, p50, p90 = (float(v) for v in np.percentile(rates, [10, 50, 90]))
    warmup = [round(b - a, 3) for a, b in zip(seconds, seconds[1:warm + 1])]
    return {"img_s": batch * len(durations) / (seconds[-1] - seconds[warm]), "first_step_s": seconds[1],
            "warmup_steps": warm, "warmup_step_s": warmup,
            "per_step_img_s": {"p10": p10, "p50": p50, "p90": p90}}


# --- the step benchmark ------------------------------------------------------------------------------

def step_benchmark(preset: str, device: str, batch: int, latent: int, targets: str, iters: int, warmup: int,
                   path: Path, job: str = "lora", checkpointing: bool = False) -> tuple[str, float]:
    """The job's step benchmark: (variant, img/s). LoRA: benchmarks/lora_step.py, on CUDA
    `ours-bf16-lora-graphs`, elsewhere `ours-bf16-lora` (the job runs without graphs there too).
    ControlNet: benchmarks/controlnet_step.py, `ours-bf16-cn-graphs` on CUDA, `ours-bf16-cn` elsewhere."""
    cuda = device == "cuda"
    if job == "lora":
        graphs = cuda and not checkpointing           # the job's own rule (train/jobs/graphs.py)
        script, variant = "lora_step.py", "ours-bf16-lora-graphs" if graphs else "ours-bf16-lora"
        extra = ["--targets", targets] + (["--gradient-checkpointing"] if checkpointing else [])
    else:
        script, variant, extra = "controlnet_step.py", "ours-bf16-cn-graphs" if cuda else "ours-bf16-cn", []
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--preset", preset, "--device", device,
           "--batch", str(batch), "--size", str(latent), *extra, "--variants", variant,
           "--iters", str(iters), "--warmup", str(warmup), "--json", str(path)]
    done = subprocess.run(cmd, cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"benchmarks/{script} failed (exit {done.returncode}):\n{done.stdout[-3000:]}"
                           f"\n{done.stderr[-3000:]}")
    return variant, json.loads(path.read_text())["rows"][0][variant]["img_s"]


# --- the call ----------------------------------------------------------------------------------------

def measure(args, work: Path) -> dict:
    t0 = time.perf_counter()
    sdxl = is_sdxl(args.preset)
    if sdxl:
        from benchmarks.lora_step import BENCH_PRESETS
        from benchmarks.sdxl_base import build_sdxl_pipeline
        base = build_sdxl_pipeline(work / "base", args.preset if args.preset in PRESETS
                                   else BENCH_PRESETS[args.preset], args.seed)
    else:
        base = build_pipeline(work / "base", args.preset, args.seed)
    sizes = write_pictures(work / "pictures", args.pictures, picture_sizes(args.size, SHAPES[:args.buckets]),
                           args.seed)
    print(f"built the {args.preset} pipeline and {len(sizes)} pictures in {time.perf_counter() - t0:.0f} s",
          flush=True)
    out = work / "out"
    overrides = job_overrides(base, work / "pictures", out, args.steps, args.batch, args.size, args.targets,
                              min(min(s) for s in sizes), args.job)
    wall, stamped = run_job(overrides, args.device, work / "job.log", args.job, SDXL_RECIPE if sdxl else None)
    steady = steady_rate(read_loss_log(out / "loss.jsonl"), args.batch, args.warmup_fraction)
    latent = args.size // latent_scale(args.preset)
    variant, step_img_s = step_benchmark(args.preset, args.device, args.batch, latent, args.targets,
                                         args.step_iters, args.step_warmup, work / "step.json", args.job,
                                         checkpointing=sdxl)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    warmup = warmup_breakdown(stamped, args.job) | {"first_step_s": steady["first_step_s"]}
    return {"job": args.job, "torch": torch.__version__, "gpu": gpu, "preset": args.preset, "size": args.size,
            "targets": args.targets if args.job == "lora" else None, "buckets": args.buckets,
            "batch": args.batch, "pictures": len(sizes),
            "steps": args.steps,
            "job_img_s": steady["img_s"], "step_img_s": step_img_s, "step_variant": variant,
            "job_vs_step": steady["img_s"] / step_img_s, "first_step_s": steady["first_step_s"],
            "cache_build_s": cache_build_seconds(stamped), "wall_s": wall,
            "per_step_img_s": steady["per_step_img_s"], "warmup_steps": steady["warmup_steps"],
            "warmup_step_s": steady["warmup_step_s"], "warmup": warmup,
            "graphs": graph_lines(stamped),
            "overrides": [o for o in overrides if o.split("=")[0] not in PATH_KEYS]}


def is_sdxl(preset: str) -> bool:
    return preset.startswith("sdxl")


def print_table(r: dict) -> None:
    cache = "-" if r["cache_build_s"] is None else f"{r['cache_build_s']:.1f} s"
    p = r["per_step_img_s"]
    w = r["warmup"]
    what = f"targets {r['targets']}" if r["job"] == "lora" else "Canny hints"
    print(f"\n{r['job']} job end to end, {r['preset']} {r['size']} px, {what}, batch {r['batch']}, "
          f"{r['pictures']} pictures, {r['steps']} steps, {r['gpu']}, torch {r['torch']}")
    for name, value in [("job steady img/s", f"{r['job_img_s']:.1f}"),
                        (f"step img/s ({r['step_variant']})", f"{r['step_img_s']:.1f}"),
                        ("job / step", f"{r['job_vs_step']:.3f}"),
                        ("per-step img/s p10/p50/p90", f"{p['p10']:.1f} / {p['p50']:.1f} / {p['p90']:.1f}"),
                        ("first step", f"{r['first_step_s']:.1f} s"), ("cache build", cache),
                        ("job wall", f"{r['wall_s']:.1f} s"),
                        ("load / setup", " / ".join("-" if w[k] is None else f"{w[k]:.1f} s"
                                                    for k in ("load_s", "setup_s"))),
                        (f"{len(w['captures'])} graph captures (Triton)",
                         f"{w['captures_s']:.1f} s ({w['triton_s']:.1f} s)")]:
        print(f"  {name:40} {value}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd15", choices=[*PRESETS, "sdxl-tiny"],
                    help="sdxl / sdxl-tiny: the SDXL pipeline and configs/sdxl_lora.yaml (see SDXL_RECIPE)")
    ap.add_argument("--size", type=int, default=512, help="data.resolution; the pictures are made around it")
    ap.add_argument("--pictures", type=int, default=320)
    ap.add_argument("--buckets", type=int, default=len(SHAPES), choices=range(1, len(SHAPES) + 1),
                    help="how many of the aspect ratios (a bucket each) the pictures take, in SHAPES' order")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--job", default="lora", choices=list(RECIPES))
    ap.add_argument("--batch", type=int, help="train.batch_size (default: the step benchmark's, 32 for lora, "
                                              "8 for controlnet)")
    ap.add_argument("--targets", default="attn-ff", choices=["attn", "attn-ff", "full"],
                    help="LoRA targets of the job and of the step (attn-ff: the sd15 recipe's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cuda", "cpu"])
    ap.add_argument("--warmup-fraction", type=float, default=0.1, help="of the steps, at least 3, not timed")
    ap.add_argument("--step-iters", type=int, help="timed steps of the step benchmark (10; 2 on a CPU)")
    ap.add_argument("--step-warmup", type=int, help="its untimed steps first (3; 1 on a CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="folder for the pipeline, pictures and job output (default: a temporary "
                                   "one, removed at the end); must not exist")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "job_e2e.json"))
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if is_sdxl(args.preset) and args.job != "lora":
        ap.error("--preset sdxl measures the LoRA job (configs/sdxl_lora.yaml)")
    args.batch = args.batch or (SDXL_BATCH if is_sdxl(args.preset) else BATCH[args.job])
    args.step_iters = args.step_iters or (10 if cuda else 2)
    args.step_warmup = args.step_warmup if args.step_warmup is not None else (3 if cuda else 1)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="job_e2e-"))
    work.mkdir(parents=True, exist_ok=not args.work)
    try:
        result = measure(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    return result


if __name__ == "__main__":
    main()
