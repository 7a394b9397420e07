"""`data.root` as a Hugging Face `datasets` dataset, read through the `datasets` library.

    data.source    data.root holds                                 read with
    saved          what Dataset(Dict).save_to_disk wrote:          datasets.load_from_disk: the Arrow
                   state.json + dataset_info.json + *.arrow, or    files memory-mapped in place
                   dataset_dict.json and a folder per split
    parquet        a local Hub dataset folder: *.parquet files     datasets.load_dataset(root): its
                   (data/train-00000-of-00001.parquet), README     Arrow copy goes to `cache_dir`
                   configs                                         (the jobs: output.dir/cache/datasets)
    imagefolder    image files + metadata.csv or metadata.jsonl    datasets.load_dataset("imagefolder",
                   (`file_name` and the other columns)             data_dir=root): paths and columns
    auto           the first that fits, in this order; else a plain folder (folder.py). A metadata.csv
    (default)      makes an imagefolder; a metadata.jsonl stays folder.py's (its `text`/`caption`
                   key) unless data.caption_column names another column.

Columns: `data.image_column` (default "image": an Image feature, embedded bytes or a file path, or a
string column of paths relative to root), `data.caption_column` (default "text", else "caption":
the names datasets' imagefolder documentation and most Hub datasets use), `data.split` (default
"train"); the ControlNet job's `control.column` names the conditioning images. A column that is not
there is an error naming the columns that are (before, a folder with a metadata.csv trained on empty
captions and exited 0).

Every row goes through the folder's policy (folder.accept_image: duplicates, decode, size limits, the
missing-caption policy) into the same data report; images an imagefolder's metadata does not list
(datasets leaves them out) are reported as `unlisted`. A record is keyed by the SHA-256 of its image
bytes, so the same pictures as a folder and as a dataset share latent-cache entries. Nothing under
root is written: `datasets` keeps what it prepares under `cache_dir`.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from adapterkit.train.console import bar
from adapterkit.train.data.folder import (
    IMAGE_EXTENSIONS,
    METADATA_NAME,
    CaptionedImageFolder,
    DataConfig,
    ImageRecord,
    ScanReport,
    accept_image,
    check_usable,
    folder_repeats,
    scan_folder,
    settle_caption,
)

SOURCES = ("imagefolder", "saved", "parquet")
CAPTION_COLUMNS = ("text", "caption")         # tried in this order when data.caption_column is None
CSV_NAME = "metadata.csv"                     # datasets' imagefolder metadata, beside metadata.jsonl


def _files(root: Path):
    """Non-hidden files under root (hidden folders not entered)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield from (Path(dirpath, n) for n in filenames if not n.startswith("."))


def detect_source(cfg: DataConfig) -> str:
    """'folder' or one of SOURCES: data.source, or for 'auto' what root holds (module docstring)."""
    if cfg.source != "auto":
        return cfg.source
    root = Path(cfg.root)
    if not root.is_dir():
        return "folder"                          # scan_folder names the problem
    if (root / "dataset_dict.json").is_file() or ((root / "state.json").is_file()
                                                  and (root / "dataset_info.json").is_file()):
        return "saved"
    names = {p.name for p in _files(root)}
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    if CSV_NAME in names or (METADATA_NAME in names and cfg.caption_column not in (None, *CAPTION_COLUMNS)):
        return "imagefolder"
    return "folder"


def scan_data(cfg: DataConfig, cache_dir: str | os.PathLike | None = None
              ) -> tuple[list[ImageRecord], ScanReport, DatasetRows | None]:
    """folder.scan_folder, or for a `datasets` source (data.source, detected when auto) its rows through
    the same policy; `cache_dir`: where `datasets` may keep its Arrow copy of a parquet or imagefolder
    source (None: its default cache). `datasets` is imported only for a `datasets` source."""
    source = detect_source(cfg)
    if source == "folder":
        return (*scan_folder(cfg), None)
    return scan_dataset(cfg, source, cache_dir)


def open_data(cfg: DataConfig, cache_dir: str | os.PathLike | None = None) -> CaptionedImageFolder:
    """The training pictures of cfg.root, whatever it is (scan_data). Several (data.datasets):
    datasets_list.open_data."""
    if cfg.datasets:
        raise ValueError("data.datasets lists several datasets: open them with "
                         "train.data.datasets_list.open_data")
    records, report, rows = scan_data(cfg, cache_dir)
    return CaptionedImageFolder(records, cfg, report, rows)


def load_rows(cfg: DataConfig, source: str, cache_dir: str | os.PathLike | None = None):
    """The split's `datasets.Dataset` of `source` at cfg.root (module docstring)."""
    import datasets

    root = Path(os.path.abspath(cfg.root))
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {cfg.root!r} is not a folder"
                                + ("" if root.exists() else " (it does not exist)"))
    cache = None if cache_dir is None else str(cache_dir)
    try:
        if source == "saved":
            ds = datasets.load_from_disk(str(root))
        elif source == "parquet":
            ds = datasets.load_dataset(str(root), cache_dir=cache)
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"data.root {cfg.root!r} cannot be read as a {source} dataset by `datasets` "
                         f"({type(e).__name__}: {str(e)[:300]}); check data.source (auto, folder, "
                         "imagefolder, saved, parquet) and the folder") from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise ValueError(f"the {source} dataset {cfg.root!r} has no split {cfg.split!r} (it has "
                             f"{sorted(ds)}): set data.split to one of them")
        ds = ds[cfg.split]
    return ds


def column(ds, name: str | None, what: str, key: str, candidates: tuple[str, ...] = (), where: str = ""
           ) -> str:
    """The column `name` (or the first of `candidates` there when None); an error naming the columns."""
    names = list(ds.column_names)
    if name is not None and name in names:
        return name
    if name is None:
        found = [c for c in candidates if c in names]
        if found:
            return found[0]
        asked = " or ".join(repr(c) for c in candidates)
    else:
        asked = repr(name)
    raise ValueError(f"the dataset {where} has no {what} column {asked}; its columns "
                     f"are {names}: set {key} to the one that holds the {what}s")


class DatasetRows:
    """A split's rows, read back by row number: image bytes of a column (embedded or from its path)."""

    def __init__(self, ds, root: Path, image_column: str = "image"):
        import datasets

        self.root, self.image_column = root, image_column
        for name, feature in ds.features.items():
            if isinstance(feature, datasets.Image):     # bytes and path, not a decoded PIL image
                ds = ds.cast_column(name, datasets.Image(decode=False))
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def cell(self, row: int, column: str) -> tuple[bytes | None, Path | None]:
        """(embedded bytes, None) or (None, the file the cell names) of `column` at `row`."""
        value = self.ds[row][column]
        raw, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
        if path is not None and not isinstance(path, str):
            raise ValueError(f"column {column!r} row {row} holds a {type(value).__name__}, not an image")
        if raw is not None or path is None:     # with embedded bytes, `path` is only the original's name
            return raw, None
        return None, Path(path) if Path(path).is_absolute() else self.root / path

    def image_bytes(self, row: int, column: str | None = None) -> bytes:
        raw, file = self.cell(row, column or self.image_column)
        if raw is not None:
            return raw
        if file is None:
            raise ValueError(f"column {column!r} row {row} holds no image")
        return file.read_bytes()


def scan_dataset(cfg: DataConfig, source: str, cache_dir: str | os.PathLike | None = None
                 ) -> tuple[list[ImageRecord], ScanReport, DatasetRows]:
    """The rows of a `datasets` source through folder.py's policy: records, report and the rows the
    pictures are read back from (record.row)."""
    root = Path(os.path.normpath(os.path.abspath(cfg.root)))
    ds = load_rows(cfg, source, cache_dir)
    where = f"{cfg.root!r} ({source}, split {cfg.split})"
    image_col = column(ds, cfg.image_column, "image", "data.image_column", where=where)
    caption_col = column(ds, cfg.caption_column, "caption", "data.caption_column", CAPTION_COLUMNS, where)
    rows = DatasetRows(ds, root, image_col)
    captions = ds[caption_col]
    report = ScanReport(root, cfg.missing_caption, source=source)
    report.image_files = len(rows)
    records, seen, listed = [], {}, set()
    for i in bar(range(len(rows)), desc="scan", unit="img"):
        raw, file = rows.cell(i, image_col)
        inside = file is not None and file.is_relative_to(root)
        rel = file.relative_to(root).as_posix() if inside else f"{cfg.split}[{i}]"
        if file is not None:
            listed.add(file)
        caption = captions[i]
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"column {caption_col!r} holds {type(caption).__name__} values (row {i}), not "
                             "text: set data.caption_column to a column of strings")
        try:
            data = raw if raw is not None else file.read_bytes()
        except (OSError, AttributeError) as e:
            report.add("unreadable", rel, f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}")
            continue
        repeats = folder_repeats(Path(rel), cfg.kohya_repeats) if inside else (".", 1)
        rec = accept_image(data, rel, file if file is not None else root / rel,
                           partial(settle_caption, caption, rel, cfg, report), cfg, report, seen, repeats,
                           row=i)
        if rec is not None:
            records.append(rec)
    if source == "imagefolder":
        for p in sorted(p for p in _files(root) if p.suffix.lower() in IMAGE_EXTENSIONS):
            if p not in listed:
                report.image_files += 1
                report.add("unlisted", p.relative_to(root).as_posix())
    report.accepted = len(records)
    check_usable(records, report, cfg)
    return records, report, rows
