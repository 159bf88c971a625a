"""Proves that the engine's backbone export loads into torchvision / timm with strict=True.

Not run in CI (it needs torch, torchvision, timm). First run the Rust test that writes the files:
    cargo test --release --test io_export
then, from the repository root:
    python3 tests/reference/io_export_check.py [folder]
The folder defaults to target/tmp/io_export (Cargo's CARGO_TARGET_TMPDIR).

Each file is loaded with safetensors.torch.load_file + load_state_dict(strict=True); then every
value is compared with what the Rust test put in its store (the shared generator; convolution
weights were generated in the engine's O x KH x KW x I layout and must come back as O x I x KH x
KW), and one forward pass must give finite logits.
"""
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def expected(name, shape):
    """The value tests/io_export.rs::full_store gave entry `name` (PyTorch shape `shape`)."""
    if len(shape) == 4:
        o, i, kh, kw = shape
        return torch.from_numpy(common.randn(0, name, [o, kh, kw, i]).transpose(0, 3, 1, 2).copy())
    if name.endswith("running_var"):
        return torch.from_numpy(common.rand(0, name, shape, 0.5, 1.5))
    if name.endswith("running_mean"):
        return torch.from_numpy(common.randn(0, name, shape))
    if name.endswith("num_batches_tracked"):
        return torch.tensor(7, dtype=torch.int64)
    return torch.from_numpy(common.randn(0, name, shape, 0.02))


def check(model, path, classifier):
    sd = load_file(path)
    model.load_state_dict(sd, strict=True)
    got = model.state_dict()
    for name, v in got.items():
        if name.startswith(classifier):
            continue
        want = expected(name, list(v.shape))
        assert v.dtype == want.dtype, f"{name}: dtype {v.dtype} vs {want.dtype}"
        assert torch.equal(v, want), f"{name}: values differ"
    model.eval()
    with torch.no_grad():
        y = model(torch.from_numpy(common.randn(1, "image", [2, 3, 224, 224])))
    assert y.shape == (2, 1000) and torch.isfinite(y).all(), "forward is not finite"
    print(f"OK {path}: {len(sd)} tensors, strict load, values and forward checked")
    return sd


def main():
    import timm
    import torchvision

    folder = sys.argv[1] if len(sys.argv) > 1 else os.path.join("target", "tmp", "io_export")
    sd = check(torchvision.models.resnet50(), os.path.join(folder, "resnet50.safetensors"), "fc.")
    assert torch.count_nonzero(sd["fc.weight"]) == 0, "fc must be zeros"
    sd = check(timm.create_model("vit_small_patch16_224", pretrained=False),
               os.path.join(folder, "vit_small_patch16_224.safetensors"), "head.")
    want = common.randn(0, "head.weight", [1000, 384], 0.02)
    assert np.array_equal(sd["head.weight"].numpy(), want), "head.weight differs"


if __name__ == "__main__":
    main()
