"""`data.root` as a `datasets` dataset (train/data/hf_datasets.py): an imagefolder with metadata.csv,
a save_to_disk folder and a parquet folder, each read through the real `datasets` library, give the
pictures, captions and cache keys the same pictures give as a plain folder; missing columns are
errors naming the columns; nothing under the dataset's folder changes."""
import datasets
import numpy as np
import pytest

from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig
from adapterkit.train.data.hf_datasets import detect_source, open_data
from adapterkit.train.data.pairs import HintSource, PairedFolder
from support.pictures import png_bytes, shape_image

datasets.disable_progress_bars()
N = 5
CAPTIONS = [f"a shape number {i}, tag{i}" for i in range(N)]


def cfg(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), **{"resolution": 64, "bucket_step": 16, "min_side": 16, **kw})


def pictures(folder, captions=True):
    """N PNGs (one in a subfolder) with same-name .txt captions: the plain-folder twin."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"img{i}.png" if i else "sub/img0.png" for i in range(N)]
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(png_bytes(shape_image(i)))
        if captions:
            (folder / name).with_suffix(".txt").write_text(CAPTIONS[i])
    return names


def csv_folder(folder, header="file_name,text"):
    names = pictures(folder, captions=False)
    rows = "\n".join(f'{n},"{c}"' for n, c in zip(names, CAPTIONS))
    (folder / "metadata.csv").write_text(f"{header}\n{rows}\n")
    return folder


def embedded(folder, tmp_path) -> datasets.Dataset:
    """The pictures of a plain folder as a Dataset with embedded bytes (what push_to_hub stores)."""
    names = pictures(tmp_path / "src", captions=False)
    rows = {"image": [{"bytes": (tmp_path / "src" / n).read_bytes(), "path": n.split("/")[-1]}
                      for n in names],
            "text": CAPTIONS,
            "conditioning_image": [{"bytes": png_bytes(shape_image(i + 1)), "path": None} for i in range(N)]}
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                               "conditioning_image": datasets.Image()})
    return datasets.Dataset.from_dict(rows, features=feats)


def snapshot(root):
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def keys(folder: CaptionedImageFolder):
    return sorted((r.sha256, r.caption, r.size) for r in folder.records)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    pictures(root)
    return open_data(cfg(root))


def test_metadata_csv_captions_are_read_not_left_empty(tmp_path, reference):
    root = csv_folder(tmp_path / "csv")
    before = snapshot(root)
    folder = open_data(cfg(root), tmp_path / "hf")
    assert detect_source(cfg(root)) == "imagefolder" and folder.report.source == "imagefolder"
    assert keys(folder) == keys(reference)            # same bytes, same captions, same sizes
    assert all(r.caption for r in folder.records)
    assert "missing_caption" not in folder.report.entries
    for i in range(N):                                 # the pixels read back are the file's
        j = [r.sha256 for r in reference.records].index(folder.records[i].sha256)
        assert np.array_equal(np.asarray(folder.load_image(i)), np.asarray(reference.load_image(j)))
    assert snapshot(root) == before                    # nothing written under the dataset


def test_metadata_csv_without_a_caption_column_is_an_error_naming_the_columns(tmp_path):
    root = csv_folder(tmp_path / "csv", header="file_name,prompt")
    with pytest.raises(ValueError, match=r"no caption column 'text' or 'caption'.*'prompt'.*"
                                         r"data.caption_column"):
        open_data(cfg(root), tmp_path / "hf")
    folder = open_data(cfg(root, caption_column="prompt"), tmp_path / "hf")
    assert sorted(r.caption for r in folder.records) == sorted(CAPTIONS)


def test_imagefolder_reports_pictures_its_metadata_leaves_out(tmp_path):
    root = csv_folder(tmp_path / "csv")
    (root / "extra.png").write_bytes(png_bytes(shape_image(9)))
    folder = open_data(cfg(root), tmp_path / "hf")
    assert [rel for rel, _ in folder.report.entries["unlisted"]] == ["extra.png"]
    assert len(folder.records) == N and "unlisted" in folder.report.summary()


def test_save_to_disk_and_parquet_give_the_folders_cache_keys(tmp_path, reference):
    ds = embedded(tmp_path / "src", tmp_path)
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    for source in ("saved", "hub"):
        root = tmp_path / source
        before = snapshot(root)
        folder = open_data(cfg(root), tmp_path / "hf")
        assert folder.report.source == {"saved": "saved", "hub": "parquet"}[source]
        assert keys(folder) == keys(reference), source
        assert all(r.row == i for i, r in enumerate(folder.records))
        j = [r.sha256 for r in reference.records].index(folder.records[2].sha256)
        assert np.array_equal(np.asarray(folder.load_image(2)), np.asarray(reference.load_image(j)))
        assert snapshot(root) == before


def test_dataset_dict_split_and_bad_columns(tmp_path):
    ds = embedded(tmp_path / "src", tmp_path)
    datasets.DatasetDict({"train": ds.select(range(3)), "test": ds.select(range(3, N))}).save_to_disk(
        str(tmp_path / "dd"))
    assert len(open_data(cfg(tmp_path / "dd")).records) == 3
    assert len(open_data(cfg(tmp_path / "dd", split="test")).records) == 2
    with pytest.raises(ValueError, match=r"no split 'valid'.*\['test', 'train'\]"):
        open_data(cfg(tmp_path / "dd", split="valid"))
    with pytest.raises(ValueError, match=r"no image column 'pixels'.*'image'.*data.image_column"):
        open_data(cfg(tmp_path / "dd", image_column="pixels"))


def test_bad_rows_follow_the_folder_policy(tmp_path):
    ds = embedded(tmp_path / "src", tmp_path)
    rows = ds.cast_column("image", datasets.Image(decode=False)).to_dict()
    rows["image"][1] = {"bytes": rows["image"][1]["bytes"][:60], "path": "cut.png"}   # truncated
    rows["image"][3] = dict(rows["image"][0])                                         # duplicate
    rows["text"][4] = None                                                            # no caption
    datasets.Dataset.from_dict(rows, features=ds.features).save_to_disk(str(tmp_path / "bad"))
    folder = open_data(cfg(tmp_path / "bad", missing_caption="skip"))
    found = {k: [rel for rel, _ in v] for k, v in folder.report.entries.items()}
    assert found == {"corrupt": ["train[1]"], "duplicate": ["train[3]"], "missing_caption": ["train[4]"]}
    assert [r.row for r in folder.records] == [0, 2]


def test_controlnet_pairs_by_the_conditioning_column(tmp_path):
    ds = embedded(tmp_path / "src", tmp_path)
    ds.save_to_disk(str(tmp_path / "saved"))
    paired = PairedFolder.scan(cfg(tmp_path / "saved"), HintSource(column="conditioning_image"))
    assert paired.pairs.paired == N
    for i in range(N):
        hint = paired.load_conditioning(i)
        assert np.array_equal(np.asarray(hint), np.asarray(shape_image(i + 1)))
    with pytest.raises(ValueError, match=r"no conditioning image column 'edges'.*'conditioning_image'"):
        PairedFolder.scan(cfg(tmp_path / "saved"), HintSource(column="edges"))
    plain = tmp_path / "plain"
    pictures(plain)
    with pytest.raises(ValueError, match="plain folder: pair it with control.folder"):
        PairedFolder.scan(cfg(plain), HintSource(column="conditioning_image"))


# -- the jobs -------------------------------------------------------------------------------------

def test_lora_from_a_saved_dataset_equals_the_lora_from_its_folder(lora_pipeline, lora_images, tmp_path):
    """The same pictures and captions as a folder and as a save_to_disk dataset: the same cache keys
    and the same trained LoRA."""
    import torch

    from adapterkit.train.jobs.lora import main
    from support.recipes import last_adapter_state, lora_recipe

    names = sorted(p.name for p in lora_images.glob("*.png"))
    ds = datasets.Dataset.from_dict(
        {"image": [str(lora_images / n) for n in names],
         "text": [(lora_images / n).with_suffix(".txt").read_text() for n in names]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    a = main(lora_recipe(lora_pipeline, lora_images, tmp_path / "folder", **{"train.steps": 2}))
    b = main(lora_recipe(lora_pipeline, tmp_path / "saved", tmp_path / "dataset", **{"train.steps": 2}))
    entries = [sorted(p.name for p in (out / "cache" / "images").rglob("*.safetensors")) for out in (a, b)]
    assert entries[0] and entries[0] == entries[1]
    sa, sb = last_adapter_state(a), last_adapter_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_controlnet_job_trains_from_a_conditioning_column(controlnet_pipeline, tmp_path):
    from adapterkit.train.jobs.controlnet import main
    from support.recipes import controlnet_recipe

    embedded(tmp_path / "src", tmp_path).save_to_disk(str(tmp_path / "saved"))
    out = main(controlnet_recipe(controlnet_pipeline, tmp_path / "saved", tmp_path / "run",
                                 **{"control.column": "conditioning_image", "train.steps": 2,
                                    "train.batch_size": 2}))
    weights = out / "controlnet" / "diffusion_pytorch_model.safetensors"
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        md = f.metadata()
    # the run's record (train/jobs/run_metadata.py) in the ControlNet file too, no path in it
    assert md["ss_steps"] == "2" and md["ss_num_train_images"] == str(N) and "ss_tag_frequency" in md
    assert md["modelspec.architecture"].endswith("/controlnet") and "adapterkit_precision" in md
    assert not any(str(tmp_path) in v for v in md.values())
