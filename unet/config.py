"""U-Net configuration: one typed record per resolution stage, and the presets.

A config describes the architecture only; it never names a file. `to_diffusers()` / `from_diffusers()`
translate to and from the `config.json` that diffusers writes beside `UNet2DConditionModel` weights,
so a folder saved by either library can be read by the other.

SDXL differs from SD1.x/2.x in data only: three stages with attention in the lower two, per-stage
transformer depth (1, 2, 10), head width 64, linear proj_in/out, and the `text_time` added embedding
(diffusers' `addition_embed_type="text_time"`): each of the six size/crop ids gets the same sinusoidal
features as a timestep (`addition_time_embed_dim`=256 wide), these are concatenated after the pooled
text embedding (1280) and a TimestepEmbedding MLP (`add_embedding`, 2816 -> 1280 -> 1280) maps the
result onto the time embedding, to which it is added.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One resolution level of the encoder, mirrored in the decoder.

    channels: feature width at this level.
    attention: whether each ResNet block here is followed by a cross-attention transformer.
    heads: attention heads (head width = channels // heads). SD1.x uses 8 heads everywhere;
        SD2.x/SDXL fix the head width at 64 instead, so their head count grows with the width.
    depth: transformer blocks per attention layer (1 for SD1.x/2.x, up to 10 in SDXL).
    """
    channels: int
    attention: bool = True
    heads: int = 8
    depth: int = 1

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of an SD-style conditional U-Net. Defaults are SD1.5."""
    stages: tuple[Stage, ...] = (
        Stage(320), Stage(640), Stage(1280), Stage(1280, attention=False),
    )
    in_channels: int = 4
    out_channels: int = 4
    layers_per_block: int = 2          # ResNets per encoder stage; the decoder has one more
    context_dim: int = 768             # width of the text embeddings (CLIP ViT-L/14: 768)
    linear_projection: bool = False    # proj_in/proj_out as Linear (SD2.x) instead of 1x1 Conv (SD1.x)
    norm_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 64              # nominal latent size; informative only
    upcast_attention: bool = False     # SD2.1-768-v sets it; recorded for diffusers, SDPA needs no upcast
    # The added embedding. None (SD1.x/2.x): the time embedding alone. "text_time" (SDXL): pooled text
    # + sinusoidal size/crop ids through `add_embedding`, added to the time embedding. The three
    # numbers below default to SDXL's and are read only when addition_embed is set.
    addition_embed: str | None = None
    pooled_dim: int = 1280             # width of the pooled text embedding (SDXL: CLIP bigG's projection)
    time_ids: int = 6                  # ids per picture (SDXL: original h, w, crop top, left, target h, w)
    addition_time_embed_dim: int = 256  # sinusoidal features per id

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(
            s if isinstance(s, Stage) else Stage(**s) for s in self.stages))
        if not self.stages:
            raise ValueError("UNetConfig needs at least one stage")
        for i, s in enumerate(self.stages):
            if s.channels % self.norm_groups:
                raise ValueError(f"stage {i}: channels={s.channels} is not divisible by "
                                 f"norm_groups={self.norm_groups}")
            if s.attention and s.channels % s.heads:
                raise ValueError(f"stage {i}: channels={s.channels} is not divisible by heads={s.heads}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.addition_embed not in ADDITION_EMBEDS:
            raise ValueError(f"addition_embed must be one of {ADDITION_EMBEDS}, got {self.addition_embed!r}")
        if self.addition_embed and (self.pooled_dim < 1 or self.time_ids < 1
                                    or self.addition_time_embed_dim < 2 or self.addition_time_embed_dim % 2):
            raise ValueError(f"text_time needs pooled_dim >= 1, time_ids >= 1 and an even "
                             f"addition_time_embed_dim >= 2; got {self.pooled_dim}, {self.time_ids}, "
                             f"{self.addition_time_embed_dim}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.stages[0].channels

    @property
    def projection_class_embeddings_input_dim(self) -> int | None:
        """Input width of `add_embedding` (SDXL: 1280 + 6 * 256 = 2816); None without an added embedding."""
        if self.addition_embed is None:
            return None
        return self.pooled_dim + self.time_ids * self.addition_time_embed_dim

    @property
    def num_skips(self) -> int:
        """Number of encoder feature maps handed to the decoder (and to ControlNet residuals)."""
        return 1 + len(self.stages) * self.layers_per_block + (len(self.stages) - 1)

    def replace(self, **changes) -> UNetConfig:
        return dataclasses.replace(self, **changes)

    # diffusers config.json <-> UNetConfig ---------------------------------------------------------

    def to_diffusers(self) -> dict:
        """The `config.json` dict of the equivalent diffusers `UNet2DConditionModel`."""
        down = ["CrossAttnDownBlock2D" if s.attention else "DownBlock2D" for s in self.stages]
        up = ["CrossAttnUpBlock2D" if s.attention else "UpBlock2D" for s in reversed(self.stages)]
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": down,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": up,
            "block_out_channels": [s.channels for s in self.stages],
            "layers_per_block": self.layers_per_block,
            # diffusers names the head COUNT `attention_head_dim` (its issue #2011); we follow it.
            "attention_head_dim": [s.heads for s in self.stages],
            "transformer_layers_per_block": [s.depth for s in self.stages],
            "cross_attention_dim": self.context_dim,
            "use_linear_projection": self.linear_projection,
            "norm_num_groups": self.norm_groups,
            "norm_eps": self.norm_eps,
            "upcast_attention": self.upcast_attention,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "act_fn": "silu",
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "center_input_sample": False,
            "addition_embed_type": self.addition_embed,
            "addition_time_embed_dim": self.addition_time_embed_dim if self.addition_embed else None,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
        }

    @classmethod
    def from_diffusers(cls, cfg: dict) -> UNetConfig:
        """Read a diffusers `UNet2DConditionModel` config dict; refuse features this U-Net lacks.

        diffusers' config gives the added embedding's input width, not how it splits into pooled text
        and ids: the split is taken as SDXL's, `time_ids` (6) ids, the rest pooled text.
        """
        unsupported = {
            "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
            "encoder_hid_dim_type": None, "time_embedding_act_fn": None,
            "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
            "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
            "only_cross_attention": False, "dual_cross_attention": False, "downsample_padding": 1,
            "mid_block_scale_factor": 1, "conv_in_kernel": 3, "conv_out_kernel": 3,
            "mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None,
            "reverse_transformer_layers_per_block": None, "time_cond_proj_dim": None,
            "time_embedding_dim": None, "timestep_post_act": None, "class_embeddings_concat": False,
            "mid_block_only_cross_attention": None, "cross_attention_norm": None,
            "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
            "attention_type": "default", "dropout": 0.0,
        }
        for key, expected in unsupported.items():
            value = cfg.get(key, expected)
            if isinstance(value, (list, tuple)) and key == "only_cross_attention":
                value = any(value)  # diffusers also accepts one flag per stage
            if value != expected:
                raise ValueError(f"diffusers U-Net config has {key}={value!r}; adapterkit's U-Net "
                                 f"supports only {expected!r} (SD1.x/2.x/SDXL architecture)")
        channels = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
        n = len(channels)
        down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        up = list(cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
        known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
        for t in down:
            if t not in known:
                raise ValueError(f"unsupported down block type {t!r}; expected one of {sorted(known)}")
        attention = [known[t] for t in down]
        expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
        if up != expected_up:
            raise ValueError(f"up_block_types {up} do not mirror down_block_types {down}; "
                             f"expected {expected_up}")
        if len(down) != n:
            raise ValueError(f"{len(down)} down blocks but {n} block_out_channels")
        heads = _per_stage(cfg.get("attention_head_dim", 8), n, "attention_head_dim")
        depth = _per_stage(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
        layers = cfg.get("layers_per_block", 2)
        if not isinstance(layers, int):
            raise ValueError(f"per-stage layers_per_block {layers} is not supported")
        ctx = cfg.get("cross_attention_dim", 1280)
        if not isinstance(ctx, int):
            raise ValueError(f"per-stage cross_attention_dim {ctx} is not supported")
        return cls(
            stages=tuple(Stage(c, a, h, d) for c, a, h, d in zip(channels, attention, heads, depth)),
            in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
            layers_per_block=layers, context_dim=ctx,
            linear_projection=bool(cfg.get("use_linear_projection", False)),
            norm_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
            sample_size=cfg.get("sample_size", 64) or 64,
            upcast_attention=bool(cfg.get("upcast_attention", False)),
            **_added_from_diffusers(cfg),
        )

    # plain dict (for metadata and YAML) -------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {sorted(unknown)}; valid keys: {sorted(names)}")
        return cls(**d)


ADDITION_EMBEDS = (None, "text_time")


def _added_from_diffusers(cfg: dict) -> dict:
    """The UNetConfig fields of diffusers' addition_embed_type (None or SDXL's "text_time")."""
    kind = cfg.get("addition_embed_type")
    if kind not in ADDITION_EMBEDS:
        raise ValueError(f"diffusers U-Net config has addition_embed_type={kind!r}; adapterkit's U-Net "
                         f"supports None (SD1.x/2.x) and 'text_time' (SDXL)")
    if kind is None:
        return {}
    in_dim = cfg.get("projection_class_embeddings_input_dim")
    time_dim = cfg.get("addition_time_embed_dim")
    ids = UNetConfig.time_ids
    if not isinstance(in_dim, int) or not isinstance(time_dim, int) or in_dim <= ids * time_dim:
        raise ValueError(
            "diffusers U-Net config has addition_embed_type='text_time' (SDXL) but projection_class_"
            f"embeddings_input_dim={in_dim!r} and addition_time_embed_dim={time_dim!r}: text_time needs "
            f"both, the first larger than {ids} ids x the second (SDXL: 2816 = 1280 pooled + 6 x 256); "
            "an SD1.x/2.x config has addition_embed_type None")
    return {"addition_embed": kind, "pooled_dim": in_dim - ids * time_dim, "time_ids": ids,
            "addition_time_embed_dim": time_dim}


def _per_stage(value, n: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} stages")
    return value


def _sd2_stages() -> tuple[Stage, ...]:
    # SD2.x: head width 64, so heads = channels / 64 (5, 10, 20, 20).
    return (Stage(320, heads=5), Stage(640, heads=10), Stage(1280, heads=20),
            Stage(1280, attention=False, heads=20))


PRESETS: dict[str, UNetConfig] = {
    # The bundled tiny model: 32x32x4 latents, attention only at the two coarse levels.
    "tiny": UNetConfig(
        stages=(Stage(32, attention=False, heads=2), Stage(64, heads=4), Stage(128, heads=4)),
        layers_per_block=1, context_dim=64, sample_size=32,
    ),
    "sd15": UNetConfig(),
    "sd21": UNetConfig(stages=_sd2_stages(), context_dim=1024, linear_projection=True, sample_size=96),
    # SDXL 1.0 base: no attention at 320, depths 2 and 10 below; head width 64; the text_time embedding.
    "sdxl": UNetConfig(
        stages=(Stage(320, attention=False, heads=5), Stage(640, heads=10, depth=2),
                Stage(1280, heads=20, depth=10)),
        context_dim=2048, linear_projection=True, sample_size=128, addition_embed="text_time",
    ),
}
