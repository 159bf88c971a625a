"""PyTorch side of benches/data.rs: Pillow decoding and torchvision transforms on the same first
64 files of ../shared/data/imagenet-samples, one thread, bytes already in memory.

Cases (same names as the criterion ids data/<case>):
- decode: Image.open(BytesIO).convert("RGB") (torchvision's pil_loader);
- decode_rrc224: + RandomResizedCrop(224) + ToTensor + Normalize (the PIL path of the recipes);
- suave_multicrop: + the full Suave set (SwAV's PIL pipeline: 2x224 + 8x96, flip, ColorJitter
  p 0.8, grayscale p 0.2, PIL Gaussian blur p 0.5, ToTensor, Normalize).

Run: python3 benches/torch/run.py --families data --threads 1   (after cargo bench --bench data)
"""
import io
import os
import random
import sys

from PIL import Image, ImageFilter
import torchvision.transforms as T

N = 64
ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def _dir():
    for k in (1, 2):
        d = os.path.join(ROOT, *[".."] * k, "shared", "data", "imagenet-samples", "train")
        if os.path.isdir(d):
            return d
    return None


class PILRandomGaussianBlur:
    """SwAV's blur: with probability p, ImageFilter.GaussianBlur(radius ~ U(0.1, 2))."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
        self.p, self.lo, self.hi = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


def _files():
    d = _dir()
    if d is None:
        print("SKIP data: ../shared/data/imagenet-samples not found", file=sys.stderr)
        return []
    paths = []
    for c in sorted(os.listdir(d)):
        for f in sorted(os.listdir(os.path.join(d, c))):
            paths.append(os.path.join(d, c, f))
    out = []
    for p in paths[:N]:
        with open(p, "rb") as f:
            out.append(f.read())
    return out


FILES = _files()
NORM = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.228, 0.224, 0.225])
RRC = T.Compose([T.RandomResizedCrop(224), T.ToTensor(), NORM])


def _suave():
    def crop(size, scale):
        return T.Compose([
            T.RandomResizedCrop(size, scale=scale),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            PILRandomGaussianBlur(),
            T.ToTensor(),
            NORM,
        ])
    return [crop(224, (0.14, 1.0))] * 2 + [crop(96, (0.05, 0.14))] * 8


SUAVE = _suave()


def load(b):
    return Image.open(io.BytesIO(b)).convert("RGB")


def decode():
    for b in FILES:
        load(b)


def decode_rrc224():
    for b in FILES:
        RRC(load(b))


def suave_multicrop():
    for b in FILES:
        img = load(b)
        [t(img) for t in SUAVE]


CASES = {"decode": decode, "decode_rrc224": decode_rrc224, "suave_multicrop": suave_multicrop} if FILES else {}
