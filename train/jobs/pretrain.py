"""`adapterkit train pretrain CONFIG`: train the tiny base model of the shapes world from scratch.

    main(cfg) = (render the scene pool) -> build a pixel-space U-Net + a small CLIP text encoder with a
                character-level tokenizer -> (resume) -> loop: step, guard, log, checkpoint
                -> export a diffusers-style pipeline folder `output.dir/base/` that `load_base` reads

The model works on pixels in [-1, 1] (no VAE), each `model.pixel_patch` x `pixel_patch` patch folded
into channels (`F.pixel_unshuffle`: a 64 px picture is a 32 x 32 x 12 "latent"; train.base explains
why): our U-Net with the `tiny` preset's stages at its native 32 x 32, attending to the text
encoder's last hidden state. Both are trained jointly (AdamW, fp32 weights; bf16 autocast on
CUDA; `train.compile` compiles the U-Net), and with `train.ema_decay` set, the exported model, the
samples and the checkpoints' `base/` hold an exponential moving average of the weights
(train/jobs/ema.py; the checkpoint keeps both). The loss is the MSE of the prediction the schedule names
(`model.scheduler`, a file in configs/schedulers/; "tiny-pixel": v-prediction under a cosine
schedule with zero terminal SNR, its note says why), optionally min-SNR weighted. Captions come from
`train.world.caption` (plain style only) and are dropped to "" with `data.caption_dropout` so the
model supports classifier-free guidance.

Data: scenes for step s come from a generator seeded by (data.seed, s, process), so a resumed run
sees exactly the batches the uninterrupted one saw. With `data.pool_size` = 0 every image is rendered
when its step needs it (about 4 ms an image on one core: fine for tests, too slow for a GPU); with
`pool_size` = N, N scenes drawn from `data.seed` are rendered once up front (`data.workers`
processes) and each step draws its images from the pool.

Checkpoints go through train/jobs/checkpoints.py (`save_checkpoint`, `resume`): the trained tensors of
both models (and the EMA) in one safetensors file, the optimizer, LR schedule and RNG state
(train/jobs/state.py), plus the exported pipeline folder as of that step.
"""
from __future__ import annotations

import json
import string
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from adapterkit.train.config import to_dict
from adapterkit.train.jobs.checkpoints import MUTABLE, resume
from adapterkit.train.jobs.ema import EMA
from adapterkit.train.jobs.guards import check_writable
from adapterkit.train.jobs.lock import one_run_per_output
from adapterkit.train.jobs.loop import Training, make_accelerator, run_steps
from adapterkit.train.jobs.optimizer import full_precision_state, make_optimizer
from adapterkit.train.jobs.recipe import OptimConfig, OutputConfig, SampleConfig, flat_dict
from adapterkit.train.jobs.state import TrainingState
from adapterkit.train.jobs.trackers import start_trackers
from adapterkit.train.pipeline.base import PIXEL_PATCH_KEY, BaseModel, Fingerprint, scheduler_config_named
from adapterkit.train.pipeline.parts import PIXEL_PATCHES, TextPart
from adapterkit.train.pipeline.schedule import NoiseSchedule, diffusion_loss
from adapterkit.train.world import shapes as world
from adapterkit.unet import PRESETS, UNet, save_unet
from adapterkit.unet.families import TINY

MAX_LENGTH = 77                                   # tokens per prompt, start and end included
SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|unk|>")
CHARS = string.ascii_lowercase + string.digits + string.punctuation


# --- the recipe --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PretrainModelConfig:
    image_size: int = world.SIZE                  # pixels per side
    pixel_patch: int = 2                          # p x p pixels per U-Net position (3 p^2 channels)
    scheduler: str = "tiny-pixel"                 # configs/schedulers/<name>.json: the noise schedule
    channels: tuple[int, ...] = (32, 64, 128)     # the `tiny` preset's stage widths (attention, heads kept)
    text_layers: int = 2
    text_width: int = 64                          # also the U-Net's context_dim
    text_heads: int = 2


@dataclass(frozen=True)
class PretrainDataConfig:
    seed: int = 0                                 # scenes (pool and per-step draws)
    caption_dropout: float = 0.1                  # share of captions replaced by "" (for CFG)
    pool_size: int = 0                            # 0: render every image online; N: render N once
    workers: int = 0                              # processes rendering the pool (0/1: this one)


@dataclass(frozen=True)
class PretrainLoopConfig:
    steps: int = 1000
    batch_size: int = 64
    seed: int = 0                                 # initial weights and per-step noise
    min_snr_gamma: float | None = 5.0             # None = plain MSE
    mixed_precision: Literal["bf16", "no"] = "bf16"   # autocast on CUDA only; CPU runs fp32
    ema_decay: float | None = None                # export/sample an EMA of the weights (None: the weights)
    compile: bool = False                         # torch.compile the U-Net's training steps


@dataclass(frozen=True)
class PretrainOutputConfig(OutputConfig):
    dir: str = "out/pretrain"
    checkpoint_every: int = 1000                  # 0 = only at the end (and on a signal)
    keep_checkpoints: int = 2
    log_every: int = 50


@dataclass(frozen=True)
class PretrainSampleConfig(SampleConfig):
    prompts: tuple[str, ...] = ("a red circle on a blue background",
                                "a yellow star on a purple background",
                                "a white cross on a green background",
                                "an orange triangle on a cyan background")
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 30
    guidance: float = 3.0                         # classifier-free guidance scale


@dataclass(frozen=True)
class PretrainRecipe:
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, schedule="cosine",
                                                                   warmup_steps=200))
    train: PretrainLoopConfig = field(default_factory=PretrainLoopConfig)
    output: PretrainOutputConfig = field(default_factory=PretrainOutputConfig)
    sample: PretrainSampleConfig = field(default_factory=PretrainSampleConfig)


# --- the models --------------------------------------------------------------------------------------

def make_tokenizer():
    """A character-level CLIPTokenizer: lowercase letters, digits and punctuation (each also in its
    word-final `</w>` form), no merges. CLIP's tokenizer lowercases; any other character (emoji,
    accents, ...) maps to `<|unk|>`, so every text is accepted."""
    from transformers import CLIPTokenizer
    tokens = list(SPECIALS) + list(CHARS) + [c + "</w>" for c in CHARS]
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        merges.write_text("#version: 0.2\n")
        return CLIPTokenizer(str(vocab), str(merges), unk_token="<|unk|>", bos_token=SPECIALS[0],
                             eos_token=SPECIALS[1], pad_token=SPECIALS[1], model_max_length=MAX_LENGTH)


def make_text_encoder(cfg: PretrainModelConfig, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel
    w = cfg.text_width
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=w, intermediate_size=4 * w, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, max_position_embeddings=MAX_LENGTH, projection_dim=w,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))


def make_unet(cfg: PretrainModelConfig) -> UNet:
    p = cfg.pixel_patch
    if p not in PIXEL_PATCHES or cfg.image_size % (p * 8):
        raise ValueError(f"model.pixel_patch must be one of {PIXEL_PATCHES} and model.image_size a multiple "
                         f"of 8 x pixel_patch, got pixel_patch={p}, image_size={cfg.image_size}")
    tiny = PRESETS["tiny"]
    if len(cfg.channels) != len(tiny.stages) or any(c % tiny.norm_groups for c in cfg.channels):
        raise ValueError(f"model.channels must give {len(tiny.stages)} stage widths, each a multiple of "
                         f"{tiny.norm_groups} (the GroupNorm groups), got {list(cfg.channels)}")
    stages = tuple(replace(stage, channels=c) for stage, c in zip(tiny.stages, cfg.channels))
    return UNet(tiny.replace(stages=stages, in_channels=3 * p * p, out_channels=3 * p * p,
                             sample_size=cfg.image_size // p, context_dim=cfg.text_width))


# --- the data ----------------------------------------------------------------------------------------

def _render(args: tuple[list[world.Scene], int]) -> np.ndarray:
    scenes, size = args
    return np.stack([np.asarray(world.render(s, size)) for s in scenes])


def render_scenes(scenes: list[world.Scene], size: int, workers: int = 0) -> np.ndarray:
    """(N, size, size, 3) uint8; the same bytes whatever `workers` is."""
    if workers <= 1 or len(scenes) < 256:
        return _render((scenes, size))
    chunk = -(-len(scenes) // (workers * 4))
    parts = [(scenes[i:i + chunk], size) for i in range(0, len(scenes), chunk)]
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(_render, parts)))


class ShapesData:
    """The batches of the shapes world: `batch(step, rank)` -> (pixels (B, 3, H, W) in [-1, 1],
    captions), a pure function of (data.seed, step, rank). The pool is rendered on the CPU (before
    any CUDA work, so the rendering processes fork cleanly); `to(device)` moves it."""

    def __init__(self, cfg: PretrainRecipe, device: torch.device | None = None):
        self.cfg, self.device = cfg, device or torch.device("cpu")
        self.size, self.n = cfg.model.image_size, cfg.train.batch_size
        self.pool = self.captions = None
        if cfg.data.pool_size:
            scenes = world.sample_scenes(cfg.data.pool_size, cfg.data.seed)
            t0 = time.perf_counter()
            self.pool = torch.from_numpy(render_scenes(scenes, self.size, cfg.data.workers)).to(device)
            self.captions = [world.caption(s) for s in scenes]
            print(f"rendered a pool of {len(scenes)} scenes at {self.size}px in "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)

    def to(self, device: torch.device) -> ShapesData:
        self.device = device
        if self.pool is not None:
            self.pool = self.pool.to(device)
        return self

    def rng(self, step: int, rank: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.cfg.data.seed, step, rank]))

    def batch(self, step: int, rank: int) -> tuple[torch.Tensor, list[str]]:
        rng = self.rng(step, rank)
        if self.pool is None:
            scenes = [world.sample_scene(rng) for _ in range(self.n)]
            pixels = torch.from_numpy(_render((scenes, self.size))).to(self.device)
            captions = [world.caption(s) for s in scenes]
        else:
            idx = rng.integers(len(self.pool), size=self.n)
            pixels = self.pool[torch.from_numpy(idx).to(self.device)]
            captions = [self.captions[i] for i in idx]
        drop = rng.random(self.n) < self.cfg.data.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
        return pixels.contiguous(), captions


class Tokens:
    """Caption -> token ids (padded to 77), cached: the world has a few hundred captions."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions: list[str], device: torch.device) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if new:
            ids = self.tokenizer(new, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                 return_tensors="pt").input_ids
            self.cache.update(zip(new, ids))
        return torch.stack([self.cache[c] for c in captions]).to(device)


# --- the job -----------------------------------------------------------------------------------------

@one_run_per_output
def main(cfg: PretrainRecipe) -> Path:
    """Train the tiny base described by `cfg`; returns the output folder. Resumes from its last checkpoint."""
    out = Path(cfg.output.dir)
    check_writable(out)                      # before the pool is rendered
    data = ShapesData(cfg)
    accelerator = make_accelerator(out, cfg, "pretrain")
    data.to(accelerator.device)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    tokenizer = make_tokenizer()
    set_seed(cfg.train.seed)                 # initial weights: the same in every run
    unet = make_unet(cfg.model)
    text_encoder = make_text_encoder(cfg.model, len(tokenizer))
    unet.train()
    text_encoder.train()
    named = {f"unet.{n}": p for n, p in unet.named_parameters()}
    named |= {f"text_encoder.{n}": p for n, p in text_encoder.named_parameters()}
    params = list(named.values())
    optimizer, lr_schedule = make_optimizer(cfg.optim, params, cfg.train.steps)
    model, text_model, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    ema = EMA(named, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
    averaged = ema.applied if ema else nullcontext

    def state() -> dict:
        return full_precision_state(named, None) | (ema.state() if ema else {})

    training = Training(model, params, TrainingState(accelerator, state, optimizer, lr_schedule,
                                                     what="pretrain model config"))
    if cfg.train.compile and accelerator.device.type == "cuda":
        model = torch.compile(model)

    start = resume(training.state, out, cfg, (*MUTABLE, "data.workers"))
    tokens = Tokens(tokenizer)
    scheduler_config = scheduler_config_named(cfg.model.scheduler)
    schedule = NoiseSchedule.from_config(scheduler_config)
    if accelerator.is_main_process:
        n_unet = sum(p.numel() for p in unet.parameters())
        n_text = sum(p.numel() for p in text_encoder.parameters())
        print(f"pretrain: U-Net {n_unet / 1e6:.2f}M + text encoder {n_text / 1e6:.2f}M parameters, "
              f"{cfg.model.image_size}px, batch {cfg.train.batch_size} x {accelerator.num_processes}",
              flush=True)
        print(start_trackers(accelerator, cfg.output.trackers, "pretrain", out, flat_dict(to_dict(cfg))),
              flush=True)
    base = as_base(cfg, unet, text_encoder, tokenizer, scheduler_config)     # for the samples

    def export(folder: Path, step: int | None = None) -> Path:
        with averaged():
            path = export_pipeline(Path(folder) / "base", unet, text_encoder, tokenizer, scheduler_config,
                                   pixel_patch=cfg.model.pixel_patch)
        if step is None:                                                   # the final export
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
            print(f"base model: {path} ({size:.1f} MB)", flush=True)
        return path

    run_steps(accelerator, cfg, out, start,
              step=lambda step: train_step(cfg, accelerator, model, text_model, data, tokens, schedule, step),
              training=training, export=export,
              sample=(lambda s, path: sample_grid(cfg, base, path, averaged)) if cfg.sample.prompts else None,
              images_per_step=cfg.train.batch_size * accelerator.num_processes, name="pretrain",
              what="base model", after_step=ema.update if ema else None)
    return out


def train_step(cfg: PretrainRecipe, accelerator, model, text_model, data: ShapesData, tokens: Tokens,
               schedule: NoiseSchedule, step: int) -> float:
    """One forward and backward; returns the loss (mean over processes). Noise and timesteps come
    from a generator seeded by (train.seed, step, process)."""
    device, rank = accelerator.device, accelerator.process_index
    pixels, captions = data.batch(step, rank)
    pixels = F.pixel_unshuffle(pixels.to(device), cfg.model.pixel_patch)
    seed = int(np.random.SeedSequence([cfg.train.seed, step, rank]).generate_state(1)[0])
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(pixels.shape, generator=g, device=device)
    t = schedule.sample_timesteps(len(pixels), g, device)
    noisy = schedule.add_noise(pixels, noise, t)
    autocast = (torch.autocast("cuda", torch.bfloat16)
                if device.type == "cuda" and cfg.train.mixed_precision == "bf16" else nullcontext())
    with autocast:
        context = text_model(tokens(captions, device))[0]
        pred = model(noisy, t, context)
    loss = diffusion_loss(pred, pixels, noise, t, schedule, cfg.train.min_snr_gamma)
    accelerator.backward(loss)
    return accelerator.reduce(loss.detach(), reduction="mean").item()


def as_base(cfg: PretrainRecipe, unet: UNet, text_encoder, tokenizer, scheduler_config: dict) -> BaseModel:
    """The models being trained as the BaseModel that `load_base` gives of their export (no VAE: pixels
    folded into channels), for `train.generate`. Its fingerprint is a placeholder: no cache keys on it."""
    text = (TextPart(TINY.text_encoders[0], text_encoder, tokenizer),)
    return BaseModel(unet=unet, vae=None, text=text, scheduler_config=scheduler_config, family=TINY,
                     fingerprint=Fingerprint(unet="training", vae=None, text_encoder="training"),
                     pixel_patch=cfg.model.pixel_patch)


@torch.no_grad()
def sample_grid(cfg: PretrainRecipe, base: BaseModel, path: Path, weights=nullcontext) -> Path:
    """DDIM samples with classifier-free guidance (`train.generate.generate`): one row per prompt,
    one column per seed, drawn inside the `weights()` context (e.g. the EMA's)."""
    from adapterkit.train.images import save_grid
    from adapterkit.train.pipeline.generate import generate
    models = (base.unet, base.text_encoder)
    was = [m.training for m in models]
    for m in models:
        m.eval()
    prompts, seeds = cfg.sample.prompts, cfg.sample.seeds
    with weights():
        cells = generate(base, [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds],
                         steps=cfg.sample.steps, guidance=cfg.sample.guidance, sampler=cfg.sample.sampler,
                         size=cfg.model.image_size, progress=True)
    for m, training in zip(models, was):
        m.train(training)
    return save_grid(list(cells), len(prompts), len(seeds), path, row_labels=list(prompts),
                     col_labels=[f"seed {s}" for s in seeds])


# --- the export --------------------------------------------------------------------------------------

def export_pipeline(folder: Path, unet: UNet, text_encoder, tokenizer, scheduler_config: dict,
                    dtype: torch.dtype = torch.float16, pixel_patch: int = 1) -> Path:
    """A diffusers-style pipeline folder without a VAE (pixel space) that `train.base.load_base`
    reads: model_index.json (with the pixel patch), unet/ (diffusers layout), text_encoder/,
    tokenizer/, scheduler/. Weights are stored in `dtype` (fp16 keeps the shipped model small)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_unet(unet, folder / "unet", layout="diffusers", dtype=dtype)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in text_encoder.state_dict().items()}
    text_encoder.save_pretrained(folder / "text_encoder", state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_adapterkit_note": "pixel-space: no vae",
             PIXEL_PATCH_KEY: pixel_patch,
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", scheduler_config.get("_class_name", "DDIMScheduler")],
             "vae": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
