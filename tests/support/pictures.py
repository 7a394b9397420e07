"""Pictures and folders for the data and ControlNet tests."""
import io

import numpy as np
from PIL import Image, ImageDraw

COLORS = [(220, 30, 30), (30, 60, 220), (30, 180, 60), (230, 210, 40)]
SHAPE_COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def shape_image(i: int, size=(64, 64)) -> Image.Image:
    img = Image.new("RGB", size, (240, 240, 240) if i % 2 else (20, 20, 20))
    d = ImageDraw.Draw(img)
    x = 6 + 2 * i
    (d.ellipse if i % 3 else d.rectangle)((x, 10, x + 30, 44), fill=COLORS[i % 4], outline=(0, 0, 0), width=3)
    return img


def write_lora_folder(root):
    """16 captioned 64x64 images of coloured shapes (and one 96x64 for a second bucket)."""
    for i in range(16):
        name, color = list(SHAPE_COLORS.items())[i % 4]
        size = (96, 64) if i == 15 else (64, 64)
        img = Image.new("RGB", size, (240, 240, 240) if i % 2 else (20, 20, 20))
        d = ImageDraw.Draw(img)
        x = 8 + 3 * i
        (d.ellipse if i % 3 else d.rectangle)((x, 12, x + 30, 42), fill=color, outline=(0, 0, 0), width=3)
        img.save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a {name} shape")
    return root


def write_controlnet_folder(root):
    """12 captioned images of coloured shapes: 11 of 64x64 and one 96x64 (a second bucket)."""
    for i in range(12):
        shape_image(i, (96, 64) if i == 11 else (64, 64)).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a shape number {i}")
    return root


def square(size=64, lo=16, hi=47, fg=255, bg=0) -> Image.Image:
    """A filled square with corners (lo, lo), (hi, hi) on a plain background."""
    im = Image.new("RGB", (size, size), (bg,) * 3)
    ImageDraw.Draw(im).rectangle([lo, lo, hi, hi], fill=(fg,) * 3)
    return im


def write_canny_folder(src):
    """A folder for the Canny converter: one good picture, one PNG cut mid-data, one text file."""
    src.mkdir()
    (src / "good.png").write_bytes(png_bytes(square()))
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    (src / "broken.png").write_bytes(data[:len(data) // 2])              # cut mid-data
    (src / "notes.txt").write_text("not an image")
    return src
