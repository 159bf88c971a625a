"""Cuts the small committed input images of the data-pipeline tests from real photographs.

Run from the repository root with ../shared/data present:  python3 tests/reference/data_fixtures.py
Writes tests/fixtures/data/{rgb_a.png, rgb_b.png, gray.png, palette.png, rgba.png, q420.jpg,
q444.jpg, progressive.jpg, gray.jpg, cmyk.jpg} (a few KB each) and PROVENANCE.md. The crops are
taken at fixed offsets, so rerunning reproduces the same files.
"""
import os

from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
# ../shared/data beside the checkout (CI), or two levels up for a git worktree under wt/.
DATA = next(
    (d for d in (os.path.join(ROOT, *[".."] * k, "shared", "data", "imagenette-mini") for k in (1, 2))
     if os.path.isdir(d)),
    None,
)
if DATA is None:
    raise SystemExit("../shared/data/imagenette-mini not found")
OUT = os.path.join(ROOT, "tests", "fixtures", "data")

SRC_A = "train/n01440764/ILSVRC2012_val_00000293.JPEG"
SRC_B = "train/n03028079/" + sorted(os.listdir(os.path.join(DATA, "train/n03028079")))[0]


def find_gray():
    for c in sorted(os.listdir(os.path.join(DATA, "train"))):
        for f in sorted(os.listdir(os.path.join(DATA, "train", c))):
            if Image.open(os.path.join(DATA, "train", c, f)).mode == "L":
                return f"train/{c}/{f}"
    raise SystemExit("no grayscale image found")


def main():
    os.makedirs(OUT, exist_ok=True)
    src_g = find_gray()
    a = Image.open(os.path.join(DATA, SRC_A)).convert("RGB").crop((90, 100, 138, 140))  # 48x40
    b = Image.open(os.path.join(DATA, SRC_B)).convert("RGB").crop((60, 70, 97, 103))  # 37x33
    g = Image.open(os.path.join(DATA, src_g)).crop((100, 100, 132, 124))  # 32x24, mode L
    a.save(os.path.join(OUT, "rgb_a.png"))
    b.save(os.path.join(OUT, "rgb_b.png"))
    g.save(os.path.join(OUT, "gray.png"))
    a.quantize(colors=32).save(os.path.join(OUT, "palette.png"))
    rgba = a.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(a.size))
    rgba.save(os.path.join(OUT, "rgba.png"))
    a.save(os.path.join(OUT, "q420.jpg"), quality=90, subsampling=2)
    b.save(os.path.join(OUT, "q444.jpg"), quality=92, subsampling=0)
    a.save(os.path.join(OUT, "progressive.jpg"), quality=85, progressive=True)
    g.save(os.path.join(OUT, "gray.jpg"), quality=90)
    b.convert("CMYK").save(os.path.join(OUT, "cmyk.jpg"), quality=95)
    with open(os.path.join(OUT, "PROVENANCE.md"), "w") as f:
        f.write(
            "# Data-pipeline fixtures\n\n"
            "Small crops of real photographs, written by `tests/reference/data_fixtures.py` from\n"
            "`../shared/data/imagenette-mini` (Imagenette 2, fast.ai; images from ImageNet\n"
            "ILSVRC-2012, ImageNet terms: non-commercial research):\n\n"
            f"- `rgb_a.png` (48x40): `{SRC_A}`, box (90, 100, 138, 140); re-encoded as `palette.png`\n"
            "  (32-colour palette), `rgba.png` (alpha gradient), `q420.jpg`, `progressive.jpg`.\n"
            f"- `rgb_b.png` (37x33): `{SRC_B}`, box (60, 70, 97, 103); re-encoded as `q444.jpg` and\n"
            "  `cmyk.jpg` (PIL CMYK JPEG, Adobe inverted).\n"
            f"- `gray.png` (32x24, 8-bit grayscale): `{src_g}`, box (100, 100, 132, 124); `gray.jpg`.\n\n"
            "`*.safetensors` are outputs of Pillow / torchvision written by\n"
            "`tests/reference/data_transforms.py`.\n"
        )
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))


if __name__ == "__main__":
    main()
