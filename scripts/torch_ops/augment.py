"""PyTorch side of kernels/augment.cu: the multi-crop augmentation of a batch of decoded 8-bit
images, done the way a PyTorch pipeline on the GPU does it: torchvision.transforms.v2's
functional ops on device tensors, view by view (RandomResizedCrop with antialiasing, flip,
ColorJitter in a random order, grayscale, Gaussian blur, solarise, Normalize), each view
written into an NHWC (channels-last) batch of the engine's dtype. Parameters are sampled once
when the op is built (with the recipe's probabilities, from the spec), so the timed callable
does only the image work, like the engine's kernel.
"""

import math
import random


def _crop(rng, h, w, scale, ratio=(3 / 4, 4 / 3)):
    # torchvision's RandomResizedCrop.get_params.
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s, s


def multicrop(torch, F, spec, rnd):
    try:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF
    except Exception:  # noqa: BLE001 - torchvision absent: no PyTorch counterpart
        return None
    dev = rnd((1,), torch.float32).device
    dtype = torch.bfloat16 if spec.get("dtype") == "bf16" else torch.float32
    rng = random.Random(7)
    imgs = [torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8, device=dev)
            for h, w in spec["images"]]
    views = spec["views"]
    # Globals first, as the engine lays them out; one channels-last batch per view size.
    sizes = sorted({int(v["size"]) for v in views}, reverse=True)
    counts = {s: sum(1 for v in views if int(v["size"]) == s) * len(imgs) for s in sizes}
    outs = {s: torch.empty((counts[s], 3, s, s), dtype=dtype, device=dev)
            .contiguous(memory_format=torch.channels_last) for s in sizes}
    plan = []
    slot = {s: 0 for s in sizes}
    for s in sizes:
        for i, img in enumerate(imgs):
            for v in views:
                if int(v["size"]) != s:
                    continue
                h, w = img.shape[1], img.shape[2]
                jit = v.get("jitter")
                p = {
                    "img": i, "out": s, "slot": slot[s],
                    "crop": _crop(rng, h, w, tuple(v["scale"])),
                    "flip": rng.random() < 0.5,
                    "interp": InterpolationMode.BICUBIC if v.get("bicubic") else InterpolationMode.BILINEAR,
                    "jitter": None, "gray": rng.random() < float(v["gray_p"]),
                    "blur": rng.uniform(0.1, 2.0) if rng.random() < float(v["blur_p"]) else None,
                    "solarize": rng.random() < float(v["solarize_p"]),
                    "mean": v["mean"], "std": v["std"],
                }
                if jit is not None and rng.random() < float(v["jitter_p"]):
                    b, c, sa, hu = (float(x) for x in jit)
                    order = list(range(4))
                    rng.shuffle(order)
                    p["jitter"] = (order, [rng.uniform(max(0, 1 - b), 1 + b),
                                           rng.uniform(max(0, 1 - c), 1 + c),
                                           rng.uniform(max(0, 1 - sa), 1 + sa),
                                           rng.uniform(-hu, hu)])
                slot[s] += 1
                plan.append(p)
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]

    def run():
        # u8 -> [0, 1] once per image, then every view from it (as the engine's kernel).
        fimgs = [TF.to_dtype(img, torch.float32, scale=True) for img in imgs]
        for p in plan:
            top, left, ch, cw = p["crop"]
            x = TF.resized_crop(fimgs[p["img"]], top, left, ch, cw, [p["out"], p["out"]],
                                interpolation=p["interp"], antialias=True)
            if p["flip"]:
                x = TF.horizontal_flip(x)
            if p["jitter"] is not None:
                order, f = p["jitter"]
                for k in order:
                    x = adjust[k](x, f[k])
            if p["gray"]:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            if p["blur"] is not None:
                x = TF.gaussian_blur(x, [23, 23], [p["blur"], p["blur"]])
            if p["solarize"]:
                x = TF.solarize(x, 0.5)
            x = TF.normalize(x, p["mean"], p["std"])
            outs[p["out"]][p["slot"]].copy_(x)
        return outs

    return run


KINDS = {"multicrop": multicrop}
