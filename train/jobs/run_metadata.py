"""What an adapter file says about the run that trained it, in the header keys clients read.

kohya sd-scripts (train_network.py) writes its training record as `ss_*` keys, every value a string,
and the clients read them from there: A1111's Lora extension (extensions-builtin/Lora network.py,
ui_edit_user_metadata.py) shows `ss_output_name` as the alias, `ss_sd_model_name` ("Model"),
`ss_training_started_at` (a Unix time, as "Date trained"), the resolutions of `ss_bucket_info`
(`{"buckets": {i: {"resolution": [w, h], "count": n}}}`), the image count of `ss_dataset_dirs`
(`{folder: {"n_repeats": r, "img_count": n}}`), the tags of `ss_tag_frequency` (`{folder: {tag:
count}}`, tags lower-cased as kohya counts them) and picks SD1/SD2/SDXL from `ss_base_model_version`
and `ss_v2`; civitai's page shows the same keys. Values that hold JSON are JSON text (A1111 parses a
value that starts with "{").

The keys here, as sd-scripts computes them where it has the same notion:
    ss_session_id            a random integer per launch (kohya: which launch a file came from)
    ss_training_started_at   Unix time of the launch; ss_training_finished_at: of the file's write
    ss_steps, ss_epoch       updates done and the epoch they reached (1-based)
    ss_num_train_images      pictures per epoch, repeats counted (kohya counts them so)
    ss_num_batches_per_epoch, ss_num_epochs, ss_batch_size_per_device, ss_total_batch_size
    ss_resolution            "(W, H)": str() of kohya's resolution tuple
    ss_sd_model_name         the base's file or folder name (kohya: os.path.basename), never its path
    ss_sd_model_hash         A1111's old hash of a single-file base (SHA-256 of the 64 KiB at 1 MiB,
                             8 hex digits) and ss_new_sd_model_hash its SHA-256 (A1111's "Model hash"
                             is the first 10 digits); a diffusers folder has neither (kohya writes
                             "IsADirectory": we leave them out)
    ss_mixed_precision       the base's dtype ("no" for fp32): adapterkit's bf16/fp16 base with fp32
                             adapter masters is what kohya's --mixed_precision does
and the recipe's numbers under kohya's names (learning rate, scheduler, optimizer, noise offset,
min-SNR gamma, caption dropout, tag shuffle, keep tokens, flip, buckets). modelspec (Stability's
ModelSpec 1.0.1 as sd-scripts' library/sai_model_spec.py writes it) gets the training resolution,
`modelspec.prediction_type` ("epsilon" or "v") and `modelspec.trigger_phrase`. Our own exact record
stays beside these: `adapterkit.training_config` (the recipe) and `adapterkit.precision`.
"""
from __future__ import annotations

import json
import math
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterkit.train.data.captions import build_caption
from adapterkit.train.data.folder import CaptionedImageFolder
from adapterkit.train.jobs.precision import outside_precision
from adapterkit.unet.weights import file_sha256

OLD_HASH_OFFSET, OLD_HASH_BYTES = 0x100000, 0x10000     # A1111's / kohya's model_hash


def file_hashes(path: Path) -> dict[str, str]:
    """ss_sd_model_hash and ss_new_sd_model_hash of a single-file base (kohya train_util.model_hash
    and calculate_sha256); {} for a folder."""
    if not path.is_file():
        return {}
    return {"ss_sd_model_hash": file_sha256(path, OLD_HASH_OFFSET, OLD_HASH_BYTES)[:8],
            "ss_new_sd_model_hash": file_sha256(path)}


def tag_frequency(dataset: CaptionedImageFolder, trigger: str) -> dict[str, dict[str, int]]:
    """{folder: {tag: count}} over the training captions (trigger included, tags lower-cased and
    stripped, as kohya's BaseDataset.set_tag_frequency counts them); folders as ss_dataset_dirs
    (several datasets: by entry name, each with its own trigger)."""
    out: dict[str, Counter] = {}
    several = getattr(dataset, "kohya_dirs", None) is not None      # datasets_list.DatasetList
    names = [r["name"] for r in dataset.rows_of()] if several else []
    for i, rec in enumerate(dataset.records):
        if several:
            k = dataset.index[i][0]
            folder, trigger = names[k], dataset.parts[k].cfg.trigger
        else:
            folder = folder_name(dataset, rec.rel)
        caption = build_caption(rec.caption, trigger, 0.0, None)
        tags = (t.strip().lower() for t in caption.split(","))
        out.setdefault(folder, Counter()).update(t for t in tags if t)
    return {k: dict(v) for k, v in out.items()}


def folder_name(dataset: CaptionedImageFolder, rel: str) -> str:
    """The top-level folder of a picture, the data root's own name for the root itself."""
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 and dataset.report and parts[0] in dataset.report.folders \
        else Path(dataset.cfg.root).name


def dataset_dirs(dataset: CaptionedImageFolder, regularization: bool = False) -> dict[str, dict[str, int]]:
    if getattr(dataset, "kohya_dirs", None) is not None:              # several datasets
        return dataset.kohya_dirs(regularization)
    if regularization:
        return {}
    folders = dataset.report.folders if dataset.report else {".": [len(dataset.records), 1]}
    root = Path(dataset.cfg.root).name
    return {(root if name == "." else name): {"n_repeats": r, "img_count": n}
            for name, (n, r) in folders.items()}


def train_samples(dataset: CaptionedImageFolder) -> int:
    """Training samples per epoch, repeats counted, held-out and regularisation pictures not."""
    if getattr(dataset, "kohya_dirs", None) is not None:
        return dataset.train_samples
    return dataset.report.epoch_samples if dataset.report else len(dataset.records)


def bucket_info(dataset: CaptionedImageFolder) -> dict:
    """kohya's bucket_info: {"buckets": {i: {"resolution": [w, h], "count": n}}} in size order."""
    counts = Counter(dataset.bucket_of)
    return {"buckets": {str(i): {"resolution": list(size), "count": counts[size]}
                        for i, size in enumerate(sorted(counts))}}


@dataclass
class RunMetadata:
    """The header keys of one launch: `static` from the recipe and data, `at(step)` the per-file ones."""
    static: dict[str, str]
    batches_per_epoch: int
    micro_per_step: int                      # micro-batches of all processes per update
    default_steps: int
    base: Path | None = None                 # a single-file base, hashed at the first file written
    _hashes: dict[str, str] | None = field(default=None, repr=False)

    def at(self, step: int | None) -> dict[str, str]:
        """ss_steps / ss_epoch / ss_training_finished_at for a file written after `step` updates (None:
        the final file, after the recipe's steps)."""
        step = self.default_steps if step is None else step
        epoch = max(1, math.ceil(step * self.micro_per_step / max(self.batches_per_epoch, 1)))
        if self._hashes is None:               # once, on the process that writes files
            self._hashes = file_hashes(self.base) if self.base else {}
        return self.static | self._hashes | {"ss_steps": str(step), "ss_epoch": str(epoch),
                              "ss_training_finished_at": str(time.time())}


def _str(v: Any) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


def run_metadata(cfg: Any, dataset: CaptionedImageFolder, *, batches_per_epoch: int, world: int,
                 base_dtype: str, prediction_type: str, adapter: dict[str, Any] | None = None) -> RunMetadata:
    """The run's keys (module docstring). `cfg` is a job recipe (model, data, optim, train, output);
    `base_dtype` the frozen base's effective dtype ("fp32", "bf16", "fp16"); `adapter` extra kohya
    network keys (ss_network_dropout, ...)."""
    data, optim, train = cfg.data, cfg.optim, cfg.train
    micro = train.grad_accum * world
    res = data.resolution
    md: dict[str, Any] = {
        "ss_session_id": secrets.randbelow(2**32),
        "ss_training_started_at": time.time(),
        "ss_output_name": cfg.output.name,
        "ss_sd_model_name": Path(cfg.model.base).name,
        "ss_resolution": (res, res),
        "ss_learning_rate": optim.lr, "ss_unet_lr": optim.lr,
        "ss_lr_scheduler": optim.schedule, "ss_lr_warmup_steps": optim.warmup_steps,
        "ss_optimizer": f"torch.optim.AdamW(weight_decay={optim.weight_decay},betas={tuple(optim.betas)},"
                        f"eps={optim.eps})",
        "ss_max_grad_norm": optim.max_grad_norm,
        "ss_max_train_steps": train.steps, "ss_seed": train.seed,
        "ss_batch_size_per_device": train.batch_size, "ss_total_batch_size": train.batch_size * micro,
        "ss_gradient_accumulation_steps": train.grad_accum,
        "ss_gradient_checkpointing": train.gradient_checkpointing,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": math.ceil(train.steps * micro / max(batches_per_epoch, 1)),
        "ss_num_train_images": train_samples(dataset),
        "ss_num_reg_images": getattr(dataset, "reg_samples", 0),
        "ss_noise_offset": train.noise_offset, "ss_min_snr_gamma": train.min_snr_gamma,
        "ss_mixed_precision": "no" if base_dtype == "fp32" else base_dtype, "ss_full_fp16": False,
        "ss_cache_latents": True, "ss_enable_bucket": True, "ss_bucket_no_upscale": False,
        "ss_min_bucket_reso": min(min(s) for s in dataset.buckets),
        "ss_max_bucket_reso": max(max(s) for s in dataset.buckets),
        "ss_bucket_info": bucket_info(dataset),
        "ss_caption_dropout_rate": data.caption_dropout, "ss_caption_tag_dropout_rate": data.tag_dropout,
        "ss_shuffle_caption": data.shuffle_tags, "ss_keep_tokens": data.keep_tokens,
        "ss_flip_aug": data.flip, "ss_random_crop": data.random_crop, "ss_color_aug": False,
        "ss_dataset_dirs": dataset_dirs(dataset),
        "ss_reg_dataset_dirs": dataset_dirs(dataset, regularization=True),
        "ss_tag_frequency": tag_frequency(dataset, data.trigger),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "adapterkit.precision": {"base": base_dtype, "adapter_compute": train.adapter_compute,
                                 "adapter_weights": "fp32", "accelerate_mixed_precision": "no",
                                 "outside_request": outside_precision() or "no"},
    } | (adapter or {})
    if data.trigger:
        md["modelspec.trigger_phrase"] = data.trigger
    return RunMetadata({k: _str(v) for k, v in md.items()}, batches_per_epoch, micro, train.steps,
                       Path(cfg.model.base))
