"""Reference outputs of the data pipeline's decoders and transforms, from Pillow and torchvision.

Run from the repository root:  python3 tests/reference/data_transforms.py
Needs torch, torchvision, Pillow, numpy, safetensors. Inputs are the small committed images in
tests/fixtures/data (see data_fixtures.py). Every transform is called with explicit parameters
(crop box, flip, factors, blur radius) that tests/data_transforms.rs passes to the engine too.
Images are stored HWC (the engine's layout), float32 in [0, 1] unless noted.

Writes:
- data/decode.safetensors: Image.open(f).convert("RGB") of every fixture file, uint8 HWC.
- data/transforms.safetensors: outputs of torchvision.transforms.functional on float tensors.
- data/blur.safetensors: PIL's GaussianBlur on the u8 images, uint8 HWC; and (in
  transforms.safetensors, "<name>_f") the same algorithm without Pillow's u8 rounding between
  passes on a 16x16 patch, from a numpy transcription that reproduces Pillow exactly when rounding.
"""
import math
import os

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter
from safetensors.numpy import save_file
from torchvision.transforms import InterpolationMode

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures", "data")

DECODE_FILES = ["gray.png", "palette.png", "rgba.png", "q420.jpg",
                "q444.jpg", "progressive.jpg", "gray.jpg", "cmyk.jpg"]

# (name, image, (top, left, height, width), size, interpolation, flip): mirrored in the Rust test.
CROPS = [
    ("crop_a_bl_down", "rgb_a.png", (3, 5, 30, 36), 20, "bilinear", False),
    ("crop_a_bl_up_flip", "rgb_a.png", (2, 1, 12, 10), 20, "bilinear", True),
    ("crop_b_bl_full", "rgb_b.png", (0, 0, 33, 37), 16, "bilinear", False),
    ("crop_a_bc_down", "rgb_a.png", (3, 5, 30, 36), 20, "bicubic", True),
    ("crop_b_bc_up", "rgb_b.png", (10, 4, 9, 14), 18, "bicubic", False),
    ("crop_b_bc_odd", "rgb_b.png", (1, 2, 31, 29), 7, "bicubic", False),
]
# Colour ops run on 16x16 patches (rows, cols) to keep the fixture file small.
PATCH_B = (slice(8, 24), slice(10, 26))
PATCH_A = (slice(4, 20), slice(20, 36))
# (name, op, factor) on the rgb_b patch as float.
COLOR = [
    ("bright_up", "brightness", 1.6), ("bright_down", "brightness", 0.45),
    ("contrast_up", "contrast", 1.7), ("contrast_down", "contrast", 0.3),
    ("sat_up", "saturation", 1.8), ("sat_down", "saturation", 0.2),
    ("hue_pos", "hue", 0.15), ("hue_neg", "hue", -0.4), ("hue_half", "hue", 0.5),
    ("gray", "grayscale", 0.0), ("solarize", "solarize", 0.0),
]
# A full ColorJitter with explicit order (torchvision's fn_idx) and factors, on the rgb_a patch.
JITTER = [
    ("jitter_1", [2, 0, 3, 1], (1.3, 0.7, 1.5, -0.08)),
    ("jitter_2", [3, 1, 0, 2], (0.6, 1.8, 0.1, 0.19)),
]
BLUR = [("blur_a_07", "rgb_a.png", 0.7), ("blur_b_19", "rgb_b.png", 1.9),
        ("blur_a_01", "rgb_a.png", 0.1), ("blur_a_13", "rgb_a.png", 1.3)]


def pil_box_radius(sigma, passes=3):
    """Pillow's _gaussian_blur_radius (BoxBlur.c), in C float precision."""
    s2 = np.float32(sigma * sigma / passes)
    big_l = np.float32(math.sqrt(12.0 * s2 + 1.0))
    l = np.float32(math.floor((big_l - 1.0) / 2.0))
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2)
    a /= 6 * (s2 - (l + 1) * (l + 1))
    return np.float32(l + a)


def _box_line(x, radius, quantize):
    r = int(radius)
    ww = int(np.float32(1 << 24) / (np.float32(radius) * 2 + 1))
    fw = ((1 << 24) - (2 * r + 1) * ww) // 2
    n = len(x)
    at = lambda i: x[min(max(i, 0), n - 1)]
    out = np.zeros(n, dtype=x.dtype)
    for i in range(n):
        bulk = sum(at(i + k) for k in range(-r, r + 1)) * ww + (at(i - r - 1) + at(i + r + 1)) * fw
        out[i] = (int(bulk) + (1 << 23)) >> 24 if quantize else bulk / float(1 << 24)
    return out


def pil_gaussian_blur(img_u8, sigma, quantize):
    """Pillow's GaussianBlur (3 extended box passes per axis, edges extended) in numpy. With
    quantize=True it rounds to u8 after every pass as Pillow does (checked equal to Pillow below);
    with quantize=False it is the same algorithm in float64, which is what the engine computes."""
    radius = pil_box_radius(sigma)
    x = img_u8.astype(np.int64 if quantize else np.float64)
    for axis in (1, 0):
        for _ in range(3):
            x = np.apply_along_axis(lambda v: _box_line(v, radius, quantize), axis, x)
    return x


def load(name):
    return Image.open(os.path.join(FIX, name)).convert("RGB")


def to_float(img):
    return torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 255.0


def hwc(t):
    return t.permute(1, 2, 0).contiguous().numpy().astype(np.float32)


def main():
    dec = {f.replace(".", "_"): np.asarray(load(f), dtype=np.uint8).copy() for f in DECODE_FILES}
    save_file(dec, os.path.join(FIX, "decode.safetensors"))

    out = {}
    for name, f, (i, j, h, w), size, interp, flip in CROPS:
        mode = InterpolationMode.BILINEAR if interp == "bilinear" else InterpolationMode.BICUBIC
        y = F.resized_crop(to_float(load(f)), i, j, h, w, [size, size], mode, antialias=True)
        if interp == "bicubic":
            y = y.clamp(0, 1)  # as torchvision does for u8 images and PIL always does
        if flip:
            y = F.hflip(y)
        out[name] = hwc(y)
    x = to_float(load("rgb_b.png"))[:, PATCH_B[0], PATCH_B[1]]
    for name, op, fac in COLOR:
        if op == "brightness":
            y = F.adjust_brightness(x, fac)
        elif op == "contrast":
            y = F.adjust_contrast(x, fac)
        elif op == "saturation":
            y = F.adjust_saturation(x, fac)
        elif op == "hue":
            y = F.adjust_hue(x, fac)
        elif op == "grayscale":
            y = F.rgb_to_grayscale(x, num_output_channels=3)
        else:
            y = F.solarize(x, 128 / 255)
        out[name] = hwc(y)
    xa = to_float(load("rgb_a.png"))[:, PATCH_A[0], PATCH_A[1]]
    for name, order, (b, c, s, h) in JITTER:
        y = xa
        for fn in order:  # torchvision.transforms.ColorJitter.forward
            if fn == 0:
                y = F.adjust_brightness(y, b)
            elif fn == 1:
                y = F.adjust_contrast(y, c)
            elif fn == 2:
                y = F.adjust_saturation(y, s)
            else:
                y = F.adjust_hue(y, h)
        out[name] = hwc(y)
    blur = {}
    for name, f, r in BLUR:
        y = load(f).filter(ImageFilter.GaussianBlur(radius=r))
        blur[name] = np.asarray(y, dtype=np.uint8).copy()  # u8 HWC
        patch = np.asarray(load(f))[PATCH_A[0], PATCH_A[1]]
        assert (pil_gaussian_blur(np.asarray(load(f)), r, True) == blur[name]).all(), name
        out[name + "_f"] = np.ascontiguousarray(pil_gaussian_blur(patch, r, False) / 255.0, dtype=np.float32)
    save_file(blur, os.path.join(FIX, "blur.safetensors"))
    # Evaluation: Resize(30) + CenterCrop(24) (the shapes of Resize(256) + CenterCrop(224)).
    for name, f in [("eval_a", "rgb_a.png"), ("eval_b", "rgb_b.png")]:
        y = F.center_crop(F.resize(to_float(load(f)), 30, InterpolationMode.BILINEAR, antialias=True), [24, 24])
        out[name] = hwc(y)
    out["normalize_b"] = hwc(F.normalize(x, [0.485, 0.456, 0.406], [0.228, 0.224, 0.225]))
    out = {k: np.ascontiguousarray(v) for k, v in out.items()}  # save_file writes raw memory
    save_file(out, os.path.join(FIX, "transforms.safetensors"))
    for f in ("decode.safetensors", "transforms.safetensors", "blur.safetensors"):
        print(f, os.path.getsize(os.path.join(FIX, f)))


if __name__ == "__main__":
    main()
