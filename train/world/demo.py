"""`adapterkit demo`: the whole story on the bundled default, on a CPU, with no download.

    adapterkit demo [--out out/demo] [--style outline|stripes] [--trigger sks] [--quick]
                    [--config configs/demo_lora.yaml] [key=value ...]

1. checks: diffusers' own UNet2DConditionModel on the bundled U-Net folder gives our U-Net's output,
   and a single-file (LDM) save of it reloads bit-exactly;
2. renders `--images` styled pictures of the shapes world with trigger-word captions
   (train.world.render_folder) into OUT/data;
3. trains a style LoRA on them with the real LoRA job (train.lora_train.main, recipe
   configs/demo_lora.yaml; `key=value` arguments override it) into OUT/lora, which holds the
   adapter files (kohya `.safetensors` and peft `.peft.safetensors`);
4. samples `--scenes` other scenes' captions (trigger included) with and without the LoRA, and
   from the scenes' edge maps with the bundled ControlNet, with and without the LoRA
   (train.quality.evaluate: same prompts, same noise in every row);
5. merges the LoRA into a copy of the base U-Net and compares it with the unmerged one;
6. writes OUT/demo_grid.png (targets | base | base + LoRA | ControlNet | ControlNet + LoRA) and
   OUT/report.json, and prints the quality report.

Everything goes under --out. A folder the demo did not make (no `.adapterkit-demo` marker) is
refused unless empty; in its own folder a rerun replaces only what the demo writes. A rerun with the
same pictures and recipe reuses the finished LoRA (steps 2-3 skipped; `RUN_KEY` in OUT/lora records
what it was trained from, written after the adapter files); `--fresh` trains it again.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from adapterkit.train.paths import data_dir

DEFAULT_ASSETS = data_dir("assets")
DEFAULT_CONFIG = data_dir("configs") / "demo_lora.yaml"
MARKER = ".adapterkit-demo"
OURS = ("data", "lora", "demo_grid.png", "report.json")   # what a rerun replaces
TRAINED = ("data", "lora")                                 # what a rerun with the same run key keeps
RUN_KEY = ".demo-run.json"
GRID_NAME, REPORT_NAME = "demo_grid.png", "report.json"
EVAL_SEED = 1                 # the measured scenes: not the training pictures (those are seed --seed)
GRID_ROWS = 8

SAMPLE_DTYPES = ("auto", "fp32", "bf16")      # --sample-dtype


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX, read from /proc/cpuinfo's flags; False
    where those cannot be read). Elsewhere oneDNN emulates bf16, which is no faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def sampling_dtype(choice: str):
    """The dtype the demo samples in. "auto": bf16 on a CPU with native bf16, where the 16 scenes sample
    1.6x faster with the same measured figures (issue 22's session, idle: 38.2 -> 24.2 s; every quality
    figure equal to 3 decimals but outline continuity, 0.919 -> 0.921), else fp32. Training, the checks
    and the merge comparison stay fp32 whatever this says."""
    from adapterkit.train.jobs.recipe import DTYPES

    if choice not in SAMPLE_DTYPES:
        raise ValueError(f"--sample-dtype must be auto, fp32 or bf16, got {choice!r}")
    if choice == "auto":
        choice = "bf16" if native_bf16() else "fp32"
    return DTYPES[choice]


# (full, --quick): pictures to train on, scenes to measure, DDIM steps, and recipe overrides.
FULL = {"images": 48, "scenes": 16, "sample_steps": 20, "overrides": []}
QUICK = {"images": 4, "scenes": 2, "sample_steps": 2,
         "overrides": ["train.steps=2", "train.batch_size=2", "output.log_every=1"]}


class Clock:
    """Wall and CPU seconds per phase, printed as they end."""

    def __init__(self):
        self.phases: dict[str, dict[str, float]] = {}
        self._t, self._c = time.perf_counter(), time.process_time()
        self._t0 = self._t

    def lap(self, name: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.phases[name] = {"wall_s": round(t - self._t, 2), "cpu_s": round(c - self._c, 2)}
        print(f"  [{name}: {t - self._t:.1f} s]", flush=True)
        self._t, self._c = t, c

    @property
    def total(self) -> float:
        return time.perf_counter() - self._t0


def check_assets(assets: Path) -> tuple[Path, Path]:
    """The bundled base and ControlNet folders, or FileNotFoundError saying how to rebuild them."""
    base, canny = assets / "tiny-base", assets / "tiny-canny"
    missing = [str(p) for p in (base / "model_index.json", base / "unet", canny / "config.json")
               if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"the demo needs the bundled tiny base and ControlNet, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (assets folder: {assets}). They ship in the "
            "repository's assets/ folder; to reproduce them on a GPU: tools/gpu_tiny_base.sh "
            "(= adapterkit train pretrain configs/tiny_pretrain.yaml, then copy out/tiny-base/base to "
            "assets/tiny-base) and tools/gpu_tiny_controlnet.sh (configs/tiny_controlnet.yaml -> "
            "assets/tiny-canny). Or point --assets at a folder holding tiny-base/ and tiny-canny/.")
    return base, canny


def prepare_out(out: Path, keep: tuple[str, ...] = ()) -> None:
    """Make `out` ours: refuse a non-empty folder without our marker; in ours, remove what we write
    (but `keep`)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"--out {out} is not empty and was not made by `adapterkit demo` (no {MARKER} "
                              "file): choose an empty or new folder; nothing was changed")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `adapterkit demo`; a rerun replaces " + ", ".join(OURS) + "\n")
    for name in (n for n in OURS if n not in keep):
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def oracle_check(unet_dir: Path, unet) -> dict[str, float]:
    """diffusers' UNet2DConditionModel on the bundled folder vs ours, and an LDM single-file round trip."""
    import torch
    from diffusers import UNet2DConditionModel

    from adapterkit.unet import load_unet, save_unet

    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ctx = torch.randn(2, 8, cfg.context_dim, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        ours = unet(x, t, ctx)
        theirs = UNet2DConditionModel.from_pretrained(unet_dir).eval()(x, t, ctx).sample
        oracle = (theirs - ours).abs().max().item()
        with tempfile.TemporaryDirectory() as tmp:
            path = save_unet(unet, Path(tmp) / "unet.safetensors", layout="ldm")
            roundtrip = (load_unet(path).eval()(x, t, ctx) - ours).abs().max().item()
    print(f"diffusers UNet2DConditionModel on {unet_dir}: max |diffusers - ours| = {oracle:.2e}; "
          f"LDM single-file save + load: max difference {roundtrip:.2e}")
    if oracle > 1e-4:
        raise RuntimeError(f"diffusers disagrees with our U-Net by {oracle}")
    if roundtrip != 0.0:
        raise RuntimeError(f"the LDM round trip changed the U-Net's output by {roundtrip}")
    return {"diffusers_max_abs_diff": oracle, "ldm_roundtrip_max_abs_diff": roundtrip}


def merge_check(base_dir: Path, lora_file: Path, unet_with_lora, weight: float = 1.0) -> dict[str, float]:
    """The LoRA merged into a fresh copy of the base U-Net vs the base with the LoRA attached, on
    random latents and real prompt embeddings at three timesteps; then unmerged (exact restore)."""
    import torch

    from adapterkit.adapters.lora_files import read_lora
    from adapterkit.adapters.merge import merge_loras, unmerge
    from adapterkit.train.pipeline.base import load_base
    from adapterkit.train.pipeline.encoding import encode_prompts
    from adapterkit.unet import unet_fingerprint

    plain = load_base(base_dir)
    before = unet_fingerprint(plain.unet)
    cfg = plain.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ctx = encode_prompts(plain, ["a red star on a blue background, sks", "a green circle on a white "
                                 "background", ""])
    t = torch.tensor([50, 500, 950])
    with torch.no_grad():
        without = plain.unet(x, t, ctx)
        record = merge_loras(plain.unet, [(read_lora(lora_file, cfg), weight)])
        merged = plain.unet(x, t, ctx)
        attached = unet_with_lora(x, t, ctx)
    delta = (attached - without).abs().max().item()                    # what the LoRA does
    diff = (merged - attached).abs().max().item()
    unmerge(plain.unet, record)
    restored = unet_fingerprint(plain.unet) == before
    print(f"merged into the base vs LoRA attached: max |merged - unmerged| = {diff:.2e} "
          f"(the LoRA itself changes outputs by up to {delta:.2e}); unmerge restores the base exactly: "
          f"{'yes' if restored else 'NO'}")
    if diff > 1e-4 * max(1.0, delta) or not restored:
        raise RuntimeError(f"merging changed the U-Net's output by {diff} (restored: {restored})")
    return {"merged_vs_unmerged_max_abs_diff": diff, "lora_effect_max_abs": delta,
            "unmerge_exact": restored}


def run_key(cfg, images: int, seed: int, style: str, trigger: str) -> dict:
    """What the demo's LoRA is a function of: the pictures (count, seed, style, trigger) and the recipe
    (paths left out: the same folder may be reached by another path)."""
    from adapterkit.train.config import to_dict
    recipe = to_dict(cfg)
    recipe["model"].pop("base", None)
    recipe["data"].pop("root", None)
    recipe["output"].pop("dir", None)
    return {"images": images, "seed": seed, "style": style, "trigger": trigger, "recipe": recipe}


def finished_lora(out: Path, key: dict, cfg) -> dict[str, Path] | None:
    """The adapter files of an earlier run with the same `key`, if all are there; else None."""
    from adapterkit.train.jobs.lora import adapter_files
    marker, lora_dir = out / "lora" / RUN_KEY, out / "lora"
    try:
        if json.loads(marker.read_text()) != json.loads(json.dumps(key)):
            return None
        files = adapter_files(cfg.output, lora_dir)
    except (OSError, ValueError):
        return None
    complete = files and all(p.is_file() for p in files.values()) and (lora_dir / "loss.jsonl").is_file()
    return files if complete else None


def summary(reports: dict) -> dict[str, float | None]:
    """The issue's figures from evaluate's rows."""
    from adapterkit.train.world.quality import ROW_BASE, ROW_CONTROL, ROW_LORA, ROW_LORA_CONTROL

    def ratio(a, b):
        return a / b if b else None

    base, lora = reports[ROW_BASE], reports[ROW_LORA]
    return {"style_with_lora": lora["style"], "style_without_lora": base["style"],
            "shape_base": base["shape"], "shape_lora": lora["shape"],
            "colour_base": base["colour"], "colour_lora": lora["colour"],
            "shape_ratio": ratio(lora["shape"], base["shape"]),
            "outline_continuity_base": base.get("outline_continuity"),
            "outline_continuity_lora": lora.get("outline_continuity"),
            "shapes_lost": lora["shapes_lost"], "size_ratio": lora["size_ratio"],
            "colour_ratio": ratio(lora["colour"], base["colour"]),
            "edge_f1_base": base["edge_f1"], "edge_f1_controlnet": reports[ROW_CONTROL]["edge_f1"],
            "edge_f1_lora": lora["edge_f1"], "edge_f1_lora_controlnet": reports[ROW_LORA_CONTROL]["edge_f1"]}


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")        # nothing from a hub, ever
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from adapterkit.adapters.controlnet_files import load_controlnet
    from adapterkit.adapters.lycoris_files import load_adapter_file
    from adapterkit.train.config import load_config, to_dict
    from adapterkit.train.images import save_grid
    from adapterkit.train.jobs.lora import LoraRecipe, adapter_files
    from adapterkit.train.jobs.lora import main as train_lora
    from adapterkit.train.jobs.recipe import dtype_name
    from adapterkit.train.pipeline.base import load_base
    from adapterkit.train.world.quality import (
        ROW_BASE,
        ROW_CONTROL,
        ROW_LORA,
        ROW_LORA_CONTROL,
        evaluate,
        format_report,
    )
    from adapterkit.train.world.shapes import STYLES, render, render_folder

    preset = QUICK if args.quick else FULL
    images = args.images or preset["images"]
    scenes = args.scenes or preset["scenes"]
    steps = args.sample_steps or preset["sample_steps"]
    if args.style not in STYLES:
        raise ValueError(f"--style must be one of {', '.join(STYLES)}")
    if min(images, scenes, steps) < 1:
        raise ValueError("--images, --scenes and --sample-steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    base_dir, canny_dir = check_assets(Path(args.assets))
    config = Path(args.config)
    if not config.exists():
        raise FileNotFoundError(f"--config {config}: no such file (the demo's recipe is {DEFAULT_CONFIG})")
    out = Path(args.out)
    cfg = load_config(config, LoraRecipe, [*preset["overrides"], *args.overrides,
                                           f"model.base={base_dir}", f"data.root={out / 'data'}",
                                           f"output.dir={out / 'lora'}"])   # validated before out is touched
    key = run_key(cfg, images, args.seed, args.style, args.trigger)
    reused = None if args.fresh or not (out / MARKER).exists() else finished_lora(out, key, cfg)
    prepare_out(out, keep=TRAINED if reused else ())
    clock = Clock()
    print(f"adapterkit demo: {args.style} style, trigger {args.trigger!r}, {images} training pictures, "
          f"{scenes} measured scenes x {steps} DDIM steps, torch {torch.__version__} on "
          f"{torch.get_num_threads()} CPU threads -> {out}")

    print("\n1. the U-Net against diffusers")
    base = load_base(base_dir)
    checks = oracle_check(base_dir / "unet", base.unet)
    clock.lap("checks")

    if reused:
        lora_dir, files = out / "lora", reused
        print(f"\n2-3. reusing the LoRA trained earlier on the same {images} pictures and recipe "
              f"({lora_dir}; --fresh trains it again)")
    else:
        print(f"\n2. {images} pictures in the {args.style} style, captions with {args.trigger!r} "
              f"-> {out / 'data'}")
        render_folder(out / "data", images, args.seed, style=args.style, trigger=args.trigger)
        clock.lap("render")

        print(f"\n3. the style LoRA: {cfg.lora.targets} rank {cfg.lora.rank}, lr {cfg.optim.lr:g}, "
              f"{cfg.train.steps} steps of batch {cfg.train.batch_size} ({config.name})", flush=True)
        lora_dir = train_lora(cfg)
        files = adapter_files(cfg.output, lora_dir)
        (lora_dir / RUN_KEY).write_text(json.dumps(key, indent=1) + "\n")      # last: the run is finished
    lora_file = files.get("kohya", next(iter(files.values())))
    sizes = {fmt: p.stat().st_size for fmt, p in files.items()}
    for fmt, p in files.items():
        print(f"   {fmt:5} {p} ({sizes[fmt] / 1e3:.1f} kB)")
    losses = [json.loads(line)["loss"] for line in (lora_dir / "loss.jsonl").read_text().splitlines() if line]
    k = max(1, len(losses) // 10)
    print(f"   loss: first {k} steps {sum(losses[:k]) / k:.4f}, last {k} steps {sum(losses[-k:]) / k:.4f}")
    clock.lap("train")

    print(f"\n4. {scenes} scenes (seed {EVAL_SEED}) with and without the LoRA and the ControlNet, "
          f"{steps} DDIM steps, guidance {args.guidance:g}", flush=True)
    load_adapter_file(base.unet, lora_file, name="style")      # fp32: the merge check's unmerged side
    dtype = sampling_dtype(args.sample_dtype)
    sampler_base = base
    if dtype != torch.float32:                                  # a copy of the base in the sampling dtype
        sampler_base = load_base(base_dir, dtype=dtype)
        load_adapter_file(sampler_base.unet, lora_file, name="style")
    print(f"   sampling in {dtype_name(dtype)} (--sample-dtype {args.sample_dtype})")
    controlnet = load_controlnet(canny_dir, base.unet, dtype=dtype)   # fingerprinted on the fp32 weights
    ev = evaluate(sampler_base, scenes, EVAL_SEED, style=args.style, trigger=args.trigger,
                  loras={"style": 1.0}, controlnet=controlnet, steps=steps, guidance=args.guidance,
                  batch_size=args.batch_size, progress=True)
    clock.lap("sample")

    print("\n5. merge the LoRA into the base")
    merge = merge_check(base_dir, lora_file, base.unet)
    clock.lap("merge")

    cols = {"target": None, "base": ROW_BASE, "base + LoRA": ROW_LORA, "ControlNet": ROW_CONTROL,
            "ControlNet + LoRA": ROW_LORA_CONTROL}
    rows = min(GRID_ROWS, scenes)
    cells = []
    for i in range(rows):
        cells += [render(ev.scenes[i]) if row is None else ev.samples[row][i] for row in cols.values()]
    grid = save_grid(cells, rows, len(cols), out / GRID_NAME, row_labels=ev.prompts[:rows],
                     col_labels=list(cols),
                     title=f"{args.style} LoRA, trigger {args.trigger!r}: {rows} of {scenes} measured scenes",
                     footer=f"DDIM, {steps} steps, guidance {args.guidance:g}, scenes of seed {EVAL_SEED} | "
                            f"base {base_dir.name} | LoRA {lora_file.name} x1 | "
                            f"ControlNet {canny_dir.name} x1")

    reports = {label: {("style" if key == args.style else key): value for key, value in report.items()
                       if key not in STYLES or key == args.style}
               for label, report in ev.reports.items()}
    figures = summary(reports)
    print(f"\n6. quality ({scenes} scenes; style = share of pictures detected as {args.style}; shape, "
          "colour = share classified as asked; edge_f1 = Canny of the picture vs the scene's edges)")
    print(format_report(reports))
    print(f"\n   style score at the trigger word: {figures['style_with_lora']:.3f} with the LoRA, "
          f"{figures['style_without_lora']:.3f} without")
    print(f"   shape / colour accuracy: base {figures['shape_base']:.3f} / {figures['colour_base']:.3f}, "
          f"with the LoRA {figures['shape_lora']:.3f} / {figures['colour_lora']:.3f}; shapes the base draws "
          f"right and the LoRA loses: {figures['shapes_lost']}, shape size with / without the LoRA: "
          + (f"{figures['size_ratio']:.3f}" if figures['size_ratio'] is not None else "-"))
    if figures["outline_continuity_lora"] is not None:
        print(f"   outline continuity (share of each contour a dark band covers): "
              f"{figures['outline_continuity_lora']:.3f} with the LoRA, "
              f"{figures['outline_continuity_base']:.3f} without")
    print(f"   edge F1: {figures['edge_f1_controlnet']:.3f} with the ControlNet, "
          f"{figures['edge_f1_base']:.3f} without (with the LoRA: {figures['edge_f1_lora_controlnet']:.3f} "
          f"vs {figures['edge_f1_lora']:.3f})")
    print(f"   merged vs unmerged U-Net: max abs difference {merge['merged_vs_unmerged_max_abs_diff']:.2e}")
    clock.lap("report")

    report = {"settings": {"style": args.style, "trigger": args.trigger, "images": images, "seed": args.seed,
                           "quick": bool(args.quick), "reused_lora": bool(reused),
                           "threads": torch.get_num_threads(),
                           "sample_dtype": dtype_name(dtype),
                           "torch": torch.__version__, "evaluation": ev.settings,
                           "recipe": to_dict(cfg)},
              "checks": checks, "adapter_files": {fmt: {"path": str(p), "bytes": sizes[fmt]}
                                                  for fmt, p in files.items()},
              "loss": {"first": losses[0], "last": losses[-1], "steps": len(losses)},
              "rows": reports, "figures": figures, "merge": merge, "grid": str(grid),
              "timings": clock.phases, "wall_s": round(clock.total, 1)}
    (out / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {grid} and {out / REPORT_NAME}; adapter files in {lora_dir}")
    print(f"demo ok in {clock.total:.0f} s")
    return 0
