"""configs/ and assets/ outside a source checkout: a wheel carries every file of both, and
train.paths finds the installed copy when there is no checkout."""
import shutil
import subprocess
import sys
import zipfile

import adapterkit.train.paths as paths
from support import REPO

DATA = ("configs", "assets")


def test_a_checkout_wins_and_an_install_falls_back_to_share(tmp_path, monkeypatch):
    checkout, share = tmp_path / "checkout", tmp_path / "share"
    (checkout / "configs").mkdir(parents=True)
    (share / "configs").mkdir(parents=True)
    monkeypatch.setattr(paths, "SOURCE", checkout)
    monkeypatch.setattr(paths, "SHARE", share)
    assert paths.data_dir("configs") == share / "configs"          # site-packages: no pyproject.toml
    (checkout / "pyproject.toml").write_text("")
    assert paths.data_dir("configs") == checkout / "configs"
    assert paths.data_dir("assets") == checkout / "assets"          # missing: named where expected


def test_the_wheel_carries_configs_and_assets(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("adapterkit", "unet", "adapters", "train", *DATA):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("adapterkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = next(n.split("/data/")[0] for n in names if "/data/share/adapterkit/" in n)
    prefix = f"{data}/data/share/adapterkit/"
    expected = {f"{prefix}{p.relative_to(REPO).as_posix()}"
                for name in DATA for p in (REPO / name).rglob("*") if p.is_file()}
    assert expected and expected <= names, sorted(expected - names)[:5]
