"""Captions: reading them (bytes -> text, metadata.jsonl) and making the training caption of a sample.

Reading never raises on bad text: a caption that is not UTF-8 is decoded as cp1252 (else latin-1) and
the scan reports it; `metadata.jsonl` lines that cannot be used are reported and ignored.

The training caption (`build_caption`) is drawn per sample from a generator seeded by
(seed, epoch, index), so workers, resume and reruns agree. In this order:

1. caption dropout: "" with probability `dropout` (for classifier-free guidance);
2. tag processing, on with `shuffle_tags` or `tag_dropout` (kohya sd-scripts' `shuffle_caption`,
   `keep_tokens`, `caption_tag_dropout_rate`): the caption is split at commas into tags; the first
   `keep_tokens` tags stay in place and are never dropped; each other tag is dropped with probability
   `tag_dropout`, except a tag equal to the trigger word (dropping it would train the picture without
   its trigger); the remaining ones are shuffled if `shuffle_tags`. Tags are joined with ", ".
3. the trigger word: prepended ("sks, caption"; `trigger_at="end"`: appended, "caption, sks") unless
   one of the tags already is it (or the caption starts, or ends, with it).

With tag processing off the caption is used exactly as written, and no random number is drawn for it.
"""
from __future__ import annotations

import codecs
import json
import logging
import os
import re
import unicodedata
from collections.abc import Collection
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)


class Report(Protocol):
    """Where problems found while reading captions go (train.data.folder.ScanReport is one)."""

    def add(self, key: str, rel: str, detail: str = "") -> None: ...


def decode_caption(raw: bytes) -> tuple[str, str]:
    """Caption bytes -> (text, note). UTF-16 by BOM, UTF-8 (BOM stripped), then cp1252 / latin-1
    with a note naming the first bad byte. Never raises."""
    note = ""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16"), ""
        except UnicodeDecodeError:
            pass
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        try:
            text, enc = raw.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:
            text, enc = raw.decode("latin-1"), "latin-1"   # decodes every byte
        note = f"not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); read as {enc}: {text[:40]!r}"
    return text, note


def control_characters(text: str) -> int:
    """How many control characters other than tab, newline and carriage return `text` holds (a NUL
    from a broken tool, an ESC from a terminal): `clean_caption` replaces them, the scan reports them."""
    return sum(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in text)


def clean_caption(text: str) -> str:
    """Control characters become spaces, whitespace runs (newlines too) one space, ends stripped."""
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return re.sub(r"\s+", " ", text).strip()


def process_tags(caption: str, rng: np.random.Generator, *, shuffle: bool = False, keep_tokens: int = 0,
                 tag_dropout: float = 0.0, trigger: str = "") -> str:
    """The caption's comma-separated tags with the first `keep_tokens` in place, each other tag dropped
    with probability `tag_dropout` (never one equal to `trigger`), the rest shuffled if `shuffle`."""
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout and rest:
        drop = rng.random(len(rest)) < tag_dropout          # one draw per tag, in order
        rest = [t for t, d in zip(rest, drop) if not d or (trigger and t == trigger)]
    if shuffle and len(rest) > 1:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    return ", ".join(kept + rest)


def build_caption(caption: str, trigger: str, dropout: float, rng: np.random.Generator | None, *,
                  shuffle_tags: bool = False, keep_tokens: int = 0, tag_dropout: float = 0.0,
                  trigger_at: str = "start") -> str:
    """The training caption: "" with probability `dropout`, else the caption through `process_tags`
    (when shuffling or dropping tags) with the trigger prepended ("trigger, caption") or, `trigger_at`
    "end", appended ("caption, trigger"); the caption as it is when one of its comma-separated parts
    already is the trigger."""
    if dropout and rng.random() < dropout:
        return ""
    if shuffle_tags or tag_dropout:
        caption = process_tags(caption, rng, shuffle=shuffle_tags, keep_tokens=keep_tokens,
                               tag_dropout=tag_dropout, trigger=trigger)
    present = caption.startswith(trigger) or caption.endswith(trigger) or \
        trigger in (part.strip() for part in caption.split(","))
    if trigger and not present:
        if not caption:
            return trigger
        return f"{caption}, {trigger}" if trigger_at == "end" else f"{trigger}, {caption}"
    return caption


def read_metadata(path: Path, root: Path, report: Report, image_extensions: Collection[str],
                  ) -> dict[Path, str]:
    """metadata.jsonl -> {normalized image path: caption}; bad lines go to the report. A `file_name`
    must name a file under `root` whose (lower-case) extension is in `image_extensions`."""
    rel = path.relative_to(root).as_posix()
    text, note = decode_caption(path.read_bytes())
    if note:
        report.add("caption_encoding", rel, note)
        logger.warning("%s: %s", path, note)
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{rel}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            report.add("metadata", where, f"not JSON ({e.msg})")
            continue
        name = row.get("file_name") if isinstance(row, dict) else None
        caption = row.get("text", row.get("caption")) if isinstance(row, dict) else None
        if not isinstance(name, str) or not isinstance(caption, str):
            report.add("metadata", where, "needs a string 'file_name' and a string 'text' (or 'caption')")
            continue
        # The same rule as datasets' PR #8325 (CWE-22): relative, inside the folder, no URL.
        target = Path(os.path.normpath(path.parent / name))
        if ("://" in name or name.startswith("file:") or PurePosixPath(name).is_absolute()
                or PureWindowsPath(name).is_absolute() or not target.is_relative_to(root)):
            report.add("metadata", where, f"unsafe file_name {name!r}: must be relative, inside the folder")
            continue
        if not target.is_file():                     # the name in the other Unicode form (NFC/NFD)?
            target = next((target.with_name(n) for n in (unicodedata.normalize("NFC", target.name),
                                                          unicodedata.normalize("NFD", target.name))
                           if target.with_name(n).is_file()), target)
        if not target.is_file() or target.suffix.lower() not in image_extensions:
            report.add("metadata", where, f"file_name {name!r} is not an image file in the folder")
            continue
        if target in out:
            report.add("metadata", where, f"second entry for {name!r}; the first is used")
            continue
        out[target] = caption
    return out
