"""LoRA file subcommands: merge | convert | extract | resize | inspect.

LoHa, LoKr and DoRA files (adapters/lycoris_files.py, told by their keys) merge into a base,
convert between the layouts that hold them, and inspect; a LoRA+LoRA merge and resize take plain
LoRA only (a LoHa or LoKr has no LoRA form; merge it into the base instead).

    adapterkit merge --base BASE A.safetensors[:RATIO] ... -o OUT      LoRAs into base weights
    adapterkit merge --base BASE A.safetensors ... --layout ldm -o OUT.safetensors [--unet-only]
                                      a whole checkpoint (U-Net + VAE + text encoders; the U-Net alone)
    adapterkit merge A.safetensors[:RATIO] B.safetensors ... -o OUT.safetensors [--rank R]
                                                                       LoRAs into one LoRA
    adapterkit convert IN.safetensors OUT.safetensors [--to kohya|peft]
    adapterkit extract --base BASE --tuned TUNED --rank R -o OUT.safetensors
    adapterkit resize IN.safetensors --rank R -o OUT.safetensors
    adapterkit inspect FILE.safetensors

BASE/TUNED are what unet.load_unet reads: a diffusers (pipeline) folder or a single-file checkpoint.
Every file written is verified (each layer's ΔW read back) and nothing unplaceable is dropped
without --allow-unmatched.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adapterkit.adapters.lora import TARGET_PRESETS, Lora
from adapterkit.adapters.lora_files import (
    FORMATS,
    base_fingerprint,
    base_metadata,
    convert_lora,
    split_lora_spec,
    summarize,
    write_lora,
)
from adapterkit.adapters.lora_files import (
    _naming_base as naming_base,
)
from adapterkit.adapters.lora_keys import is_text_path
from adapterkit.adapters.lycoris import Lycoris
from adapterkit.adapters.lycoris_files import convert_lycoris, read_adapter, summarize_lycoris
from adapterkit.adapters.merge import (
    combine_loras,
    extract_lora,
    lycoris_to_lora,
    merge_loras,
    resize_lora,
    save_merged,
)
from adapterkit.train.cli.checks import check_inputs, check_numbers, check_output, writing
from adapterkit.train.config import Range
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.checkpoint_file import VAE_PREFIX, write_checkpoint
from adapterkit.train.pipeline.parts import TEXT_PREFIXES, VAE_PREFIXES, is_pixel_space
from adapterkit.train.pipeline.single_file import SCHEDULE_MARKERS, file_schedule, text_encoders_of_file
from adapterkit.unet import PRESETS, CheckpointError, UNetConfig, load_unet, read_weights, stored_dtype
from adapterkit.unet.checkpoint import CONFIG_ERRORS
from adapterkit.unet.families import family_like
from adapterkit.unet.weights import DIFFUSERS_WEIGHTS, error_phrase

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register(subparsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--missing-alpha", choices=("error", "rank"), default="error",
                        help="modules without alpha: fail (default) or read alpha = rank, as kohya does")
    common.add_argument("--allow-unmatched", action="store_true",
                        help="use the part of a file that fits and list the keys left out "
                             "(default: fail, naming them)")
    fmt = argparse.ArgumentParser(add_help=False)
    fmt.add_argument("--format", choices=FORMATS, default="kohya",
                     help="file layout to write (kohya loads in diffusers, ComfyUI and A1111)")
    fmt.add_argument("--dtype", choices=DTYPES, help="tensor dtype to write (default: as computed)")

    p = subparsers.add_parser("merge", parents=[common], description=_merge.__doc__,
                              help="merge LoRAs into a base U-Net or into one LoRA")
    p.add_argument("loras", nargs="+", metavar="LORA[:RATIO]")
    p.add_argument("--base", help="U-Net to merge into (diffusers folder or single file); omit to "
                                  "merge the LoRAs into one LoRA file")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--layout", choices=("diffusers", "ldm"), default="diffusers",
                   help="merged U-Net as a diffusers folder, or one .safetensors checkpoint (U-Net, VAE and "
                        "text encoders in the names A1111 and ComfyUI read)")
    p.add_argument("--unet-only", action="store_true",
                   help="--layout ldm: write the U-Net alone (model.diffusion_model.*), not a whole "
                        "checkpoint")
    p.add_argument("--config-dir", help="--layout ldm, single-file --base, text-encoder LoRA modules: a "
                                        "diffusers folder of the model whose text encoder configs describe "
                                        "the file's (default: the family's shipped configs)")
    p.add_argument("--dtype", choices=(*DTYPES, "base"), default="base",
                   help="dtype of the merged weights / LoRA (default: the base's own)")
    p.add_argument("--rank", type=int, help="LoRA+LoRA: SVD the combined LoRA to this rank (default: exact)")
    p.add_argument("--format", choices=FORMATS, default="kohya", help="LoRA+LoRA: layout to write")
    p.add_argument("--allow-merged", action="store_true",
                   help="merge an adapter that the base's record says is merged into it already (its "
                        "effect adds up); default: refuse")
    p.set_defaults(func=_merge)

    p = subparsers.add_parser("convert", parents=[common], help="rewrite a LoRA in another layout",
                              description=_convert.__doc__)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", choices=(*FORMATS, "diffusers"),
                   help="target layout (default: the other one)")
    p.add_argument("--base", help="preset or U-Net path; needed for LDM-named kohya files")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--rank", type=int, help="LoHa/LoKr/Tucker LoCon: write a plain LoRA of this rank, by "
                                            "SVD of each module's ΔW (the relative error is reported per "
                                            "module)")
    p.add_argument("--conv-rank", type=int, help="with --rank: the rank of 3x3 convs (default: --rank)")
    p.add_argument("--max-error", type=float, help="with --rank: refuse (write nothing) if any module's "
                                                   "relative error exceeds this, e.g. 0.01")
    p.set_defaults(func=_convert)

    p = subparsers.add_parser("extract", parents=[fmt], help="LoRA from a base and a fine-tuned U-Net (SVD)",
                              description=_extract.__doc__)
    p.add_argument("--base", required=True)
    p.add_argument("--tuned", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--conv-rank", type=int, help="rank for 3x3 convs (default: --rank)")
    p.add_argument("--targets", choices=list(TARGET_PRESETS), default="full")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=_extract)

    p = subparsers.add_parser("resize", parents=[common, fmt], help="change a LoRA's rank (SVD)",
                              description=_resize.__doc__)
    p.add_argument("input")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=_resize)

    p = subparsers.add_parser("inspect", help="show a LoRA file's layout, base, ranks and metadata",
                              description=_inspect.__doc__)
    p.add_argument("input")
    p.add_argument("--base", help="preset or U-Net path, to place LDM-named keys")
    p.set_defaults(func=_inspect)


# --- commands ----------------------------------------------------------------------------------------

def _merge(args) -> int:
    """Merge LoRAs, LoHa, LoKr or DoRA (each with an optional ratio, `file:0.7`) into a base U-Net,
    saved as a diffusers folder or, with --layout ldm, as one whole single-file checkpoint (U-Net, VAE and
    text encoders, a LoRA's text-encoder modules merged into them; --unet-only: the U-Net alone), or
    (without --base, LoRAs only) into one LoRA file. Ratios multiply each file's ΔW."""
    items = [split_lora_spec(s) for s in args.loras]
    inputs = [("LORA", p) for p, _ in items]
    check_numbers([("--rank", args.rank, Range(1)), *((f"{p} ratio", r, Range()) for p, r in items)])
    check_inputs([*inputs, ("--base", args.base)])
    if args.base is None:
        _check_suffix(args.output, ".safetensors", "a LoRA file")
        check_output(args.output, "-o", inputs=inputs)
        loras = [(_plain(read_adapter(p, missing_alpha=args.missing_alpha)), r) for p, r in items]
        lora, report = combine_loras(loras, rank=args.rank)
        dtype = None if args.dtype == "base" else DTYPES[args.dtype]
        with writing(args.output, "-o"):
            check = write_lora(args.output, lora, args.format, dtype)
        print(f"combined {len(loras)} LoRAs into {args.output}: {check['modules']} layers, "
              f"ranks {_counts(lora.ranks())}")
        if args.rank:
            print(f"SVD to rank {args.rank}: overall relative error {report.overall:.3e}")
        return 0
    if args.rank:
        raise ValueError("--rank applies to LoRA+LoRA merges; omit it when merging into --base")
    folder = args.layout == "diffusers"
    if folder and Path(args.output).suffix == ".safetensors":
        raise ValueError(f"-o {args.output}: --layout diffusers writes a folder; pass --layout ldm for one "
                         ".safetensors file")
    if not folder:
        _check_suffix(args.output, ".safetensors", "an LDM single file (--layout ldm)")
    if args.unet_only and folder:
        raise ValueError("--unet-only applies to --layout ldm (a diffusers-layout merge writes the U-Net "
                         "folder alone)")
    check_inputs([("--config-dir", args.config_dir)])
    reads = [("--base", args.base), ("--config-dir", args.config_dir), *inputs]
    check_output(args.output, "-o", inputs=reads, folder=folder,
                 files=("config.json", DIFFUSERS_WEIGHTS[0]) if folder else ())
    dtype = stored_dtype(args.base) if args.dtype == "base" else DTYPES[args.dtype]
    if not folder and not args.unet_only:
        return _merge_checkpoint(args, items, dtype)
    model = load_unet(args.base, dtype=dtype)
    loras = [(read_adapter(p, base=model.config, missing_alpha=args.missing_alpha), r) for p, r in items]
    with_text = [(p, n) for (p, _), (lora, _) in zip(items, loras)
                 if (n := sum(is_text_path(m) for m in lora.modules))]
    if with_text and not args.allow_unmatched:
        return _merge_with_text_encoders(args, items, loras, with_text, dtype)
    merged = _merge_record(args, items, loras)
    record = merge_loras(model, loras, allow_unmatched=args.allow_unmatched)
    with writing(args.output, "-o"):
        out = save_merged(model, args.output, layout=args.layout, metadata=merged)
    print(f"merged {len(loras)} adapters ({', '.join(f'{Path(p).name}:{r:g}' for p, r in items)}) into "
          f"{len(record.originals)} layers of {args.base}; computed in fp32, written as {dtype}: {out}")
    return 0


def _merge_checkpoint(args, items: list[tuple[str, float]], dtype: torch.dtype) -> int:
    """--layout ldm: the adapters merged into the base's U-Net (and its text encoders, for a LoRA's
    text-encoder modules), written as one whole checkpoint (train/pipeline/checkpoint_file.py)."""
    base = Path(args.base)
    unet, text, vae, keep, prediction = _checkpoint_base(base, dtype)
    loras = [(read_adapter(p, base=unet.config, missing_alpha=args.missing_alpha), r) for p, r in items]
    wants_text = any(is_text_path(path) for lora, _ in loras if not isinstance(lora, Lycoris)
                     for path in lora.modules)
    if wants_text and text is None:                   # a single file: its encoders as modules
        text = text_encoders_of_file(base, dtype, Path(args.config_dir) if args.config_dir else None)
        keep = {k: v for k, v in keep.items() if not k.startswith(tuple(te.ldm_prefix for te, _ in text))}
    encoders = {te.folder: model for te, model in text or ()} if wants_text else None
    merged = _merge_record(args, items, loras)
    record = merge_loras(unet, loras, allow_unmatched=args.allow_unmatched, text_encoders=encoders)
    with writing(args.output, "-o"):
        out = write_checkpoint(args.output, unet, vae, text or (), dtype=dtype, keep=keep,
                               prediction_type=prediction, metadata=merged)
    touched = sorted({"text encoder" if is_text_path(p) else "U-Net" for p in record.originals})
    has_vae = vae is not None or any(k.startswith(VAE_PREFIX) for k in keep)
    held = ["U-Net", *(["VAE"] if has_vae else []),
            *(te.folder for te in family_like(unet.config).text_encoders)]
    print(f"merged {len(loras)} adapters ({', '.join(f'{Path(p).name}:{r:g}' for p, r in items)}) into "
          f"{len(record.originals)} layers ({', '.join(touched) or 'none'}) of {args.base}; computed in "
          f"fp32, written as {dtype}: {out}, a whole checkpoint ({', '.join(held)})")
    return 0


def _checkpoint_base(base: Path, dtype: torch.dtype):
    """(U-Net, text encoders as (row, module) or None, VAE module or None, tensors to carry over as they
    are, prediction type) of a --base that a whole checkpoint can be made from: a diffusers pipeline
    folder (every part loaded), or a full single file (the U-Net loaded, the rest kept in its names)."""
    unet_only = ("a whole checkpoint needs the base's VAE and text encoder(s): pass the model's pipeline "
                 "folder or full single file as --base, or --unet-only to write the U-Net alone")
    if base.is_dir():
        if not (base / "model_index.json").is_file():
            raise CheckpointError(f"--base {base} is a U-Net folder (no model_index.json); {unet_only}")
        loaded = load_base(base, dtype=dtype)
        return (loaded.unet, tuple((part.spec, part.model) for part in loaded.text), loaded.vae, {},
                loaded.prediction_type)
    parts, metadata = read_weights(base, keep=lambda k: k.startswith((*VAE_PREFIXES, *TEXT_PREFIXES))
                                   or k in SCHEDULE_MARKERS)
    unet = load_unet(base, dtype=dtype)
    found = {"VAE (first_stage_model.*)": is_pixel_space(unet.config) or any(k.startswith(VAE_PREFIXES)
                                                                              for k in parts),
             "text encoder": any(k.startswith(TEXT_PREFIXES) for k in parts)}
    missing = [what for what, there in found.items() if not there]
    if missing:
        raise CheckpointError(f"--base {base} holds no {' and no '.join(missing)}; {unet_only}")
    keep = {(VAE_PREFIX + k.split(".", 1)[1] if k.startswith(VAE_PREFIXES) else k): v
            for k, v in parts.items()}
    return unet, None, None, keep, file_schedule(parts, metadata)[0]


def _merge_with_text_encoders(args, items, loras, with_text, dtype) -> int:
    """Merge LoRAs that carry text-encoder modules (kohya lora_te*_, diffusers text_encoder[_2].) into a
    whole pipeline: the U-Net and the text encoders of the --base pipeline folder, written as a new
    pipeline folder (the other parts copied)."""
    from adapterkit.train.pipeline.base import load_base
    from adapterkit.train.pipeline.loras import text_encoders_of, write_merged_pipeline

    which = ", ".join(f"{Path(p).name} ({n})" for p, n in with_text)
    if args.layout != "diffusers" or not (Path(args.base) / "model_index.json").is_file():
        raise ValueError(f"{which} hold text-encoder modules: merging them needs --base a diffusers "
                         "pipeline folder (with model_index.json) and --layout diffusers, and writes a whole "
                         "pipeline folder; pass --allow-unmatched to merge the U-Net part alone")
    base = load_base(args.base, dtype=dtype)
    encoders = text_encoders_of(base)
    merged = _merge_record(args, items, loras)
    record = merge_loras(base.unet, loras, text_encoders=encoders)
    counts = {"unet": 0, **dict.fromkeys(encoders, 0)}
    for path in record.originals:
        first = path.split(".", 1)[0]
        counts[first if first in encoders else "unet"] += 1
    with writing(args.output, "-o"):
        write_merged_pipeline(base, Path(args.base), Path(args.output), dtype, metadata=merged)
    layers = ", ".join(f"{n} {'U-Net' if c == 'unet' else c} layers" for c, n in counts.items())
    print(f"merged {len(loras)} adapters ({', '.join(f'{Path(p).name}:{r:g}' for p, r in items)}) into "
          f"{layers} of {args.base}; computed in fp32, written as {dtype}: the pipeline folder "
          f"{args.output}")
    return 0


def _merge_record(args, items: list[tuple[str, float]], loras: list) -> dict[str, str]:
    """The record of merged adapters the output carries (adapters/merge_record.py): the base's own,
    then each adapter merged now. One that the base's record lists already is refused (it would count
    twice) unless --allow-merged."""
    from adapterkit.adapters.merge_record import check_not_merged, identify, merged_into, record_metadata
    before = merged_into(args.base)
    if not args.allow_merged:
        for (path, _), (adapter, _) in zip(items, loras):
            check_not_merged(args.base, path, adapter, "--allow-merged", before)
    return record_metadata(before + [identify(p, adapter, r) for (p, r), (adapter, _) in zip(items, loras)])


def _convert(args) -> int:
    """Rewrite a LoRA file in the kohya or peft/diffusers layout. Each layer's ΔW is checked equal
    after the write; keys that cannot be placed fail the conversion (or, with --allow-unmatched,
    are listed)."""
    check_inputs([("INPUT", args.input)])
    _check_suffix(args.output, ".safetensors", "a LoRA file")
    check_output(args.output, "OUTPUT", inputs=[("INPUT", args.input), ("--base", _path_or_none(args.base))])
    check_numbers([("--rank", args.rank, Range(1)), ("--conv-rank", args.conv_rank, Range(1)),
                   ("--max-error", args.max_error, Range(0, 1, low_open=True))])
    if args.rank is None and (args.conv_rank is not None or args.max_error is not None):
        raise ValueError("--conv-rank and --max-error go with --rank (a LoHa/LoKr -> LoRA conversion)")
    base = _base_config(args.base) if args.base else None
    source = read_adapter(args.input, base=base, missing_alpha="rank")
    to = args.to or ("peft" if source.format == "kohya" else "kohya")
    if args.rank is not None:
        return _convert_to_lora(args, source, base, to if args.to else "kohya")
    if isinstance(source, Lycoris):
        with writing(args.output, "OUTPUT"):
            report = convert_lycoris(args.input, args.output, to, base=base, missing_alpha=args.missing_alpha,
                                     allow_unmatched=args.allow_unmatched, dtype=DTYPES.get(args.dtype))
        print(f"{'/'.join(sorted(source.kinds()))} {report['from']} -> {report['to']}: {report['modules']} "
              f"layers, every tensor verified: {args.output}")
        _print_unplaced(report["unplaced"])
        return 0
    with writing(args.output, "OUTPUT"):
        report = convert_lora(args.input, args.output, to, base=base, missing_alpha=args.missing_alpha,
                              allow_unmatched=args.allow_unmatched, dtype=DTYPES.get(args.dtype))
    print(f"{report['from']} -> {report['to']}: {report['modules']} layers, ΔW verified "
          f"(max relative difference {report['max_rel_error']:.1e}): {args.output}")
    for note in report["notes"]:
        print(f"note: {note}")
    _print_unplaced(report["unplaced"])
    return 0


def _convert_to_lora(args, source: Lora | Lycoris, base: UNetConfig | None, to: str) -> int:
    """convert --rank: a LoHa/LoKr/Tucker-LoCon file as a plain LoRA, each module's ΔW truncated by SVD
    (exact for a Tucker LoCon at its own ranks)."""
    tucker = isinstance(source, Lycoris) and any("lora_mid.weight" in m.tensors
                                                 for m in source.modules.values())
    if not isinstance(source, Lycoris) or (source.kinds().keys() <= {"lora"} and not tucker):
        raise ValueError(f"{args.input} is a plain LoRA: change its rank with `adapterkit resize "
                         f"{args.input} --rank {args.rank} -o OUT` (--rank converts LoHa/LoKr and Tucker "
                         "LoCon files)")
    _refuse_unplaced(source, args.allow_unmatched)
    if base is None:                    # the file's adapterkit.base_config, else its family's U-Net
        base = naming_base(source)[0]
    lora, report = lycoris_to_lora(source, base, args.rank, args.conv_rank, args.max_error)
    with writing(args.output, "OUTPUT"):
        check = write_lora(args.output, lora, to, DTYPES.get(args.dtype), base=base)
    print(f"{'/'.join(sorted(source.kinds()))} -> LoRA ({to}) at rank {args.rank}"
          f"{f' (3x3 convs {args.conv_rank})' if args.conv_rank else ''}: {check['modules']} layers, overall "
          f"relative error {report.overall:.3e}: {args.output}")
    worst = report.worst(len(report.errors))
    print("relative error per module (||ΔW - ΔW_r|| / ||ΔW||), worst first:")
    for path, err in worst[:20]:
        print(f"  {source.key(path)}: {err:.3e}")
    if len(worst) > 20:
        print(f"  ... {len(worst) - 20} more, each <= {worst[20][1]:.3e}")
    return 0


def _print_unplaced(unplaced: dict[str, str]) -> None:
    if unplaced:
        print(f"left out {len(unplaced)} keys that name no U-Net layer:")
        for key, why in unplaced.items():
            print(f"  {key}: {why}")


def _extract(args) -> int:
    """Extract a LoRA approximating (tuned - base) at a given rank by SVD, with conv layers (LoCon)
    under the default `full` targets, and report the relative error."""
    check_numbers([("--rank", args.rank, Range(1)), ("--conv-rank", args.conv_rank, Range(1))])
    check_inputs([("--base", args.base), ("--tuned", args.tuned)])
    _check_suffix(args.output, ".safetensors", "a LoRA file")
    check_output(args.output, "-o", inputs=[("--base", args.base), ("--tuned", args.tuned)])
    base, tuned = load_unet(args.base), load_unet(args.tuned)
    lora, report = extract_lora(base, tuned, args.rank, targets=args.targets, conv_rank=args.conv_rank)
    lora.metadata = base_metadata(base.config, base_fingerprint(base)) | {
        "modelspec.title": Path(args.output).stem,
        "adapterkit.adapter": json.dumps({"extracted": True, "rank": args.rank, "conv_rank": args.conv_rank,
                                          "targets": args.targets}, sort_keys=True)}
    with writing(args.output, "-o"):
        write_lora(args.output, lora, args.format, DTYPES.get(args.dtype))
    print(f"extracted {len(lora.modules)} layers at rank {args.rank}: overall relative error "
          f"{report.overall:.3e}; worst: "
          + ", ".join(f"{p} {e:.2e}" for p, e in report.worst(3)))
    if report.skipped:
        print(f"{len(report.skipped)} changed tensors a LoRA cannot carry:")
        for key, why in sorted(report.skipped.items()):
            print(f"  {key}: {why}")
    print(f"wrote {args.output}")
    return 0


def _resize(args) -> int:
    """Change a LoRA's rank by SVD of each layer's ΔW, reporting the relative error."""
    check_numbers([("--rank", args.rank, Range(1))])
    check_inputs([("INPUT", args.input)])
    _check_suffix(args.output, ".safetensors", "a LoRA file")
    check_output(args.output, "-o", inputs=[("INPUT", args.input)])
    lora = _plain(read_adapter(args.input, missing_alpha=args.missing_alpha))
    _refuse_unplaced(lora, args.allow_unmatched)
    resized, report = resize_lora(lora, args.rank)
    with writing(args.output, "-o"):
        write_lora(args.output, resized, args.format, DTYPES.get(args.dtype))
    print(f"resized {len(lora.modules)} layers from ranks {_counts(lora.ranks())} to "
          f"{_counts(resized.ranks())}: overall relative error {report.overall:.3e}; worst: "
          + ", ".join(f"{p} {e:.2e}" for p, e in report.worst(3)))
    print(f"wrote {args.output}")
    return 0


def _inspect(args) -> int:
    """Print a LoRA/LyCORIS file's layout, kinds, the base it was made for, rank/alpha per block, size
    and metadata."""
    check_inputs([("INPUT", args.input)])
    base = _base_config(args.base) if args.base else None
    lycoris = isinstance(read_adapter(args.input, base=base, missing_alpha="rank"), Lycoris)
    s = summarize_lycoris(args.input, base=base) if lycoris else summarize(args.input, base=base)
    print(f"file:       {s['file']} ({s['bytes'] / 1024:.1f} KiB, {s['parameters']:,} parameters, "
          f"{'/'.join(s['dtypes'])})")
    print(f"format:     {s['format']}")
    if lycoris:
        print(f"kinds:      {_counts(s['kinds'])}")
    print(f"base:       {s['base']}")
    print(f"layers:     {s['modules']}")
    if s["nonfinite_values"]:
        print(f"BROKEN:     {s['nonfinite_values']} NaN/inf values")
    for note in s["notes"]:
        print(f"note:       {note}")
    if s["unplaced"]:
        print(f"unplaced:   {len(s['unplaced'])} keys")
        for key, why in list(s["unplaced"].items())[:20]:
            print(f"  {key}: {why}")
    print(f"\n{'block':<34} {'layers':>6}  {'kind' + ' ' * 10 if lycoris else ''}{'rank':<18} alpha")
    for block, b in s["blocks"].items():
        kinds = f"{_counts(b['kinds']):<14}" if lycoris else ""
        print(f"{block:<34} {b['modules']:>6}  {kinds}{_counts(b['ranks']):<18} {_counts(b['alphas'])}")
    print("\nmetadata:")
    for k, v in sorted(s["metadata"].items()):
        v = v if len(v) <= 160 else v[:157] + "..."
        print(f"  {k}: {v}")
    return 0


# --- helpers -------------------------------------------------------------------------------------------

def _counts(c) -> str:
    """'4' when all layers agree, else '2 (x2), 4 (x1)': value (number of layers). Kinds show as
    names; None (the rank of a LoKr of two full halves) as '-'."""
    def show(k):
        return "-" if k is None else str(k) if isinstance(k, str) else f"{k:g}"
    items = sorted(c.items(), key=lambda kv: (kv[0] is None, 0 if kv[0] is None else kv[0]))
    return ", ".join(show(k) + (f" (x{n})" if len(c) > 1 else "") for k, n in items)


def _plain(adapter: Lora | Lycoris) -> Lora:
    """A plain LoRA, or the refusal saying why a LyCORIS kind is not one."""
    if not isinstance(adapter, Lycoris):
        return adapter
    kinds = "/".join(sorted(adapter.kinds()))
    raise ValueError(f"{adapter.source} is a {kinds} adapter: it has no LoRA form "
                     "(a LoHa's and a LoKr's ΔW are not rank-r products, a DoRA's depends on the base). "
                     "Merge it into a base U-Net with --base, where its ΔW is applied exactly")


def _refuse_unplaced(lora: Lora, allow: bool) -> None:
    if lora.unplaced and not allow:
        keys = list(lora.unplaced.items())
        raise ValueError(f"{lora.source}: {len(keys)} keys cannot be placed: "
                         + ", ".join(f"{k} ({why})" for k, why in keys[:12])
                         + "; pass --allow-unmatched to use the rest")


def _base_config(arg: str) -> UNetConfig:
    """A preset name, a diffusers folder's config.json, or the config of a loadable U-Net."""
    if arg in PRESETS:
        return PRESETS[arg]
    p = Path(arg)
    if not p.exists():
        raise FileNotFoundError(f"--base {arg}: no such file or folder, and not a preset "
                                f"({', '.join(PRESETS)})")
    for cfg in (p / "config.json", p / "unet" / "config.json"):
        if cfg.is_file():
            try:
                return UNetConfig.from_diffusers(json.loads(cfg.read_text()))
            except (OSError, *CONFIG_ERRORS) as e:
                raise CheckpointError(f"{cfg} is not a usable U-Net config ({error_phrase(e)}); fix it, or "
                                      f"pass a preset name ({', '.join(PRESETS)}) as --base") from None
    return load_unet(arg).config


def _path_or_none(arg: str | None) -> str | None:
    """--base as a path for the output checks: None for a preset name."""
    return None if arg is None or arg in PRESETS else arg


def _check_suffix(path: str, suffix: str, what: str) -> None:
    if Path(path).suffix != suffix:
        raise ValueError(f"{path}: {what} is written as {suffix}; give a name ending in {suffix}")
