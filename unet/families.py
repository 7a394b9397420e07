"""Model families: what SD1.x, SD2.x, SDXL (and the bundled tiny world) ARE, in one table.

    family = family_of(unet.config)          # -> FAMILIES["sd1"], ...; the tiny family for anything else
    family = family_named("sdxl")
    family.schedule(prediction_type)         # "sd2-v": the configs/schedulers/ file of its default schedule

Every other module asks a family record instead of spelling a family constant (context widths, text
encoder classes and layers, VAE scaling, LDM and kohya prefixes, default sizes, metadata names). A new
family is a new row here plus the files it needs; it edits no signatures. The table lives in unet/, the
lowest layer, because the U-Net's config is how a family is recognised and every layer above (adapter
files, base pipelines, jobs) reads it; it is pure data and imports nothing but the U-Net config.

Sources of the facts: the released models' diffusers configs (model_index.json, unet/text_encoder/vae
config.json), the original LDM/SGM configs for single-file prefixes (formats.md §2.1), kohya sd-scripts'
naming for `lora_te*_` and `ss_base_model_version`, Stability's ModelSpec for `modelspec.architecture`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import UNetConfig


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family's pipeline.

    folder, tokenizer: its subfolders in a diffusers pipeline folder.
    cls: the transformers class that folder holds.
    width: its hidden size, the context width it contributes.
    layer: which hidden states condition the U-Net: "last" (after the final layer norm, SD1.x; SD2.x's
        diffusers encoders are already cut to the penultimate block) or "penultimate" (SDXL: the block
        before the last, without the final norm).
    pooled: whether its projected pooled output conditions the U-Net (SDXL's second encoder).
    ldm_prefix: where a single-file checkpoint keeps its tensors.
    openclip: whether the single file names them as OpenCLIP does (fused `in_proj`, transposed
        `text_projection`) rather than as transformers does.
    kohya_prefix: its LoRA modules' prefix in kohya files.
    """
    folder: str
    tokenizer: str
    cls: str
    width: int
    layer: str = "last"
    pooled: bool = False
    ldm_prefix: str = ""
    openclip: bool = False
    kohya_prefix: str = "lora_te_"


@dataclass(frozen=True)
class Family:
    """A model family. `name` is the canonical spelling (recipes, configs/base/<name>/, messages).

    unet_preset: the unet.PRESETS entry of its released U-Net.
    context_dim, linear_projection: how its U-Net config is recognised (cross-attention width and
        whether proj_in/proj_out are Linear), together with the added embedding: a family with
        time_ids recognises only U-Nets with the text_time embedding of its pooled width and id count,
        the others only U-Nets without one.
    text_encoders: in the order their hidden states are concatenated into the context.
    time_ids: extra conditioning numbers per picture (SDXL: original h, w, crop top, left, target h, w).
    vae_scale, vae_shift: latents = (z - shift) * scale.
    resolution: the side its default buckets are built around.
    prediction: the prediction type of its released models, or None where its weights do not say
        (SD2.x: 512-base predicts epsilon, 768-v predicts v).
    schedules: prediction type -> the configs/schedulers/ file of its default noise schedule.
    kohya_unet_naming: "diffusers" (`lora_unet_down_blocks_0_...`, kohya's SD1.x/2.x names) or "ldm"
        (`lora_unet_input_blocks_4_1_...`, kohya's SDXL names).
    ss_version, modelspec: what kohya's `ss_base_model_version` and ModelSpec's architecture call it;
        modelspec_by_size names variants by the U-Net's sample size (SD2.x 768-v: 96 latents).
    configs: configs/base/<configs>/ holds the part configs its single files need, if adapterkit ships them.
    pipeline_classes: prefixes of the diffusers pipeline class names (model_index.json) of this family.
    empty_prompt_zeros: diffusers' `force_zeros_for_empty_prompt` default for its pipelines: guidance's
        unconditional conditioning is all zeros, not the encoded empty prompt (SDXL). A folder's
        model_index.json may say otherwise.
    loads: whether adapterkit loads bases of this family yet; a family that does not is still recognised,
        so the refusal can name it.
    """
    name: str
    title: str
    unet_preset: str | None
    context_dim: int | None
    linear_projection: bool
    text_encoders: tuple[TextEncoder, ...]
    time_ids: int = 0
    vae_scale: float = 0.18215
    vae_shift: float = 0.0
    resolution: int = 512
    prediction: str | None = "epsilon"
    schedules: tuple[tuple[str, str], ...] = (("epsilon", "sd1"),)
    ldm_unet_prefix: str = "model.diffusion_model."
    kohya_unet_naming: str = "diffusers"
    ss_version: str | None = None
    modelspec: str | None = None
    modelspec_by_size: tuple[tuple[int, str], ...] = ()
    configs: str | None = None
    pipeline_classes: tuple[str, ...] = ()
    empty_prompt_zeros: bool = False
    loads: bool = True

    @property
    def pooled_dim(self) -> int | None:
        """Width of the pooled text vector the U-Net's added embedding takes, if any."""
        return next((te.width for te in self.text_encoders if te.pooled), None)

    def schedule(self, prediction_type: str | None = None) -> str:
        """The configs/schedulers/ name of this family's default noise schedule."""
        prediction_type = prediction_type or self.prediction
        by_type = dict(self.schedules)
        if prediction_type is None:
            raise ValueError(f"{self.title} models come in {' and '.join(by_type)} variants and the weights "
                             f"do not say which: pass prediction_type={' or '.join(map(repr, by_type))}")
        if prediction_type in by_type:
            return by_type[prediction_type]
        return by_type.get(self.prediction or "", next(iter(by_type.values())))

    def modelspec_of(self, cfg: UNetConfig) -> str | None:
        return dict(self.modelspec_by_size).get(cfg.sample_size, self.modelspec)

    def recognises(self, cfg: UNetConfig) -> bool:
        added = (cfg.pooled_dim, cfg.time_ids) if cfg.addition_embed == "text_time" else (None, 0)
        return (self.context_dim is not None and cfg.context_dim == self.context_dim
                and cfg.linear_projection == self.linear_projection
                and added == (self.pooled_dim, self.time_ids))

    def has_layout(self, cfg: UNetConfig) -> bool:
        """Whether `cfg` is built like this family's U-Net, widths aside: the same proj_in/proj_out kind
        and the same added embedding (kind and id count). A test-sized SDXL has SDXL's layout."""
        time_ids = cfg.time_ids if cfg.addition_embed == "text_time" else 0
        return cfg.linear_projection == self.linear_projection and time_ids == self.time_ids


_CLIP_L = "CLIPTextModel"

SD1 = Family(
    name="sd1", title="SD1.x", unet_preset="sd15", context_dim=768, linear_projection=False,
    text_encoders=(TextEncoder("text_encoder", "tokenizer", _CLIP_L, 768,
                               ldm_prefix="cond_stage_model.transformer."),),
    ss_version="sd_v1", modelspec="stable-diffusion-v1", configs="sd1")

SD2 = Family(
    name="sd2", title="SD2.x", unet_preset="sd21", context_dim=1024, linear_projection=True,
    text_encoders=(TextEncoder("text_encoder", "tokenizer", _CLIP_L, 1024,
                               ldm_prefix="cond_stage_model.model.", openclip=True),),   # ViT-H
    resolution=768, prediction=None, schedules=(("epsilon", "sd2"), ("v_prediction", "sd2-v")),
    ss_version="sd_v2", modelspec="stable-diffusion-v2-512",
    modelspec_by_size=((96, "stable-diffusion-v2-768-v"),))

SDXL = Family(
    name="sdxl", title="SDXL", unet_preset="sdxl", context_dim=2048, linear_projection=True,
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", _CLIP_L, 768, layer="penultimate",
                    ldm_prefix="conditioner.embedders.0.transformer.", kohya_prefix="lora_te1_"),
        TextEncoder("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", 1280,
                    layer="penultimate", pooled=True,
                    ldm_prefix="conditioner.embedders.1.model.", openclip=True,
                    kohya_prefix="lora_te2_")),                                         # bigG
    time_ids=6, vae_scale=0.13025, resolution=1024, schedules=(("epsilon", "sd1"),),
    kohya_unet_naming="ldm", ss_version="sdxl_base_v1-0", modelspec="stable-diffusion-xl-v1-base",
    configs="sdxl", pipeline_classes=("StableDiffusionXL",), empty_prompt_zeros=True)

TINY = Family(
    name="tiny", title="tiny (adapterkit's shapes world)", unet_preset="tiny", context_dim=None,
    linear_projection=False,
    text_encoders=(TextEncoder("text_encoder", "tokenizer", _CLIP_L, 0,
                               ldm_prefix="cond_stage_model.transformer."),),
    resolution=64, schedules=(("epsilon", "tiny"),))

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL, TINY)}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(cfg: UNetConfig) -> Family:
    """The family whose U-Net `cfg` is; the tiny family for anything else (the bundled tiny base and
    test-sized U-Nets, which train and sample like SD1.x)."""
    return next((f for f in FAMILIES.values() if f.recognises(cfg)), TINY)


def family_like(cfg: UNetConfig) -> Family:
    """The family `cfg` is (family_of), or else the first released family whose layout it has; the tiny
    family when none has. What a layout decides, e.g. the naming of adapter files (`kohya_unet_naming`,
    the text encoders' kohya prefixes), follows this: a reduced SDXL U-Net gets SDXL's names."""
    family = family_of(cfg)
    if family is not TINY:
        return family
    return next((f for f in FAMILIES.values() if f.context_dim is not None and f.has_layout(cfg)), TINY)


def family_of_width(context_dim: int | None) -> Family | None:
    """The released family whose cross-attention takes `context_dim`-wide context (an adapter file's
    attn2.to_k input width says which base it was made for)."""
    return next((f for f in FAMILIES.values() if f.context_dim is not None and f.context_dim == context_dim),
                None)


def family_of_ss_version(version: str) -> Family | None:
    return next((f for f in FAMILIES.values() if f.ss_version == version), None)


def family_of_modelspec(architecture: str) -> Family | None:
    """The family a ModelSpec `modelspec.architecture` names ("stable-diffusion-xl-v1-base/lora" -> SDXL):
    its own architecture or one of its size variants, with or without the "/<adapter>" suffix."""
    arch = architecture.split("/")[0]
    return next((f for f in FAMILIES.values()
                 if arch and arch in (f.modelspec, *(name for _, name in f.modelspec_by_size))), None)


def family_of_single_file(keys) -> Family | None:
    """The family whose text encoders a single-file checkpoint holds, from its key prefixes. The tiny
    family stores its encoder as SD1.x does, so a file with SD1.x prefixes answers SD1 (the U-Net config
    then tells the two apart)."""
    prefixes = {f.name: tuple(te.ldm_prefix for te in f.text_encoders) for f in (SDXL, SD2, SD1)}
    keys = list(keys)
    for name, wanted in prefixes.items():
        if any(k.startswith(wanted[0]) for k in keys):
            return FAMILIES[name]
    return None
