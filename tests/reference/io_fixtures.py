"""Fixtures of src/io: tiny torch.save checkpoints shaped like the official SwAV and DINO ones,
the values they hold, and the full key sets of torchvision's resnet50 and timm's
vit_small_patch16_224.

Writes under tests/fixtures/io/:
  swav_like.pth          zip container, the structure of swav_800ep_pretrain.pth.tar
                         ({'epoch', 'state_dict' of module.* keys, 'optimizer', 'amp'})
  swav_like_legacy.pth   the same object in the legacy (pre-1.6, non-zip) container
  dino_like.pth          the structure of dino_deitsmall16_pretrain_full_checkpoint.pth
                         ({'student', 'teacher', 'optimizer', 'epoch', 'args': Namespace,
                         'dino_loss': {'center'}, 'fp16_scaler'}), with a transposed view, an
                         offset slice, a half and a bf16 tensor
  pth_values.safetensors every tensor above as contiguous float32, keyed "<file>/<path>/<key>"
  dtypes.safetensors     randn(7, "x", [3, 5]) stored as f32, f64, f16 and bf16 (what the
                         engine's safetensors reader must accept)
  torch_keys.json        [name, shape] of every state-dict entry of resnet50 and
                         vit_small_patch16_224 (what the export must match exactly)

Run from the repository root: python3 tests/reference/io_fixtures.py
Requires torch, torchvision, timm, safetensors, numpy.
"""
import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

OUT = os.path.join(common.FIXTURES, "io")
SEED = 7


def r(name, shape):
    return torch.from_numpy(common.randn(SEED, name, shape))


def bn(sd, prefix, c, counter):
    sd[prefix + "weight"] = r(prefix + "weight", [c])
    sd[prefix + "bias"] = r(prefix + "bias", [c])
    sd[prefix + "running_mean"] = r(prefix + "running_mean", [c])
    sd[prefix + "running_var"] = r(prefix + "running_var", [c]).abs() + 0.5
    sd[prefix + "num_batches_tracked"] = torch.tensor(counter, dtype=torch.int64)


def swav_like():
    """SwAV's RN50 state dict (DDP `module.` keys, Sequential projection head), tiny widths."""
    sd = collections.OrderedDict()
    sd["module.conv1.weight"] = r("module.conv1.weight", [4, 3, 3, 3])
    bn(sd, "module.bn1.", 4, 1000)
    sd["module.layer1.0.conv1.weight"] = r("module.layer1.0.conv1.weight", [4, 4, 1, 1])
    bn(sd, "module.layer1.0.bn1.", 4, 1001)
    sd["module.layer1.0.downsample.0.weight"] = r("module.layer1.0.downsample.0.weight", [8, 4, 1, 1])
    bn(sd, "module.layer1.0.downsample.1.", 8, 1002)
    sd["module.projection_head.0.weight"] = r("module.projection_head.0.weight", [6, 8])
    sd["module.projection_head.0.bias"] = r("module.projection_head.0.bias", [6])
    bn(sd, "module.projection_head.1.", 6, 1003)
    sd["module.projection_head.3.weight"] = r("module.projection_head.3.weight", [3, 6])
    sd["module.projection_head.3.bias"] = r("module.projection_head.3.bias", [3])
    sd["module.prototypes.weight"] = r("module.prototypes.weight", [5, 3])
    # A state_dict() carries `_metadata` (pickled through BUILD on the OrderedDict).
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("bn1", {"version": 2})])
    return {
        "epoch": 800,
        "state_dict": sd,
        "optimizer": {
            "state": {0: {"momentum_buffer": r("opt.momentum_buffer", [4, 3, 3, 3])}},
            "param_groups": [{"lr": 4.8, "momentum": 0.9, "weight_decay": 1e-6, "nesterov": False,
                              "params": [0, 1, 2]}],
        },
        "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 12}},
    }


def vit_part(prefix, dim=4, heads_hidden=8):
    sd = collections.OrderedDict()
    sd[prefix + "backbone.cls_token"] = r(prefix + "backbone.cls_token", [1, 1, dim])
    # A slice at a storage offset: the file keeps the whole [1, 7, dim] storage.
    big = r(prefix + "backbone.pos_embed.base", [1, 7, dim])
    sd[prefix + "backbone.pos_embed"] = big[:, 2:, :]
    sd[prefix + "backbone.patch_embed.proj.weight"] = r(prefix + "backbone.patch_embed.proj.weight", [dim, 3, 2, 2])
    sd[prefix + "backbone.patch_embed.proj.bias"] = r(prefix + "backbone.patch_embed.proj.bias", [dim])
    b = prefix + "backbone.blocks.0."
    sd[b + "norm1.weight"] = r(b + "norm1.weight", [dim])
    sd[b + "norm1.bias"] = r(b + "norm1.bias", [dim])
    # A transposed view saved as such (stride (1, 3*dim)).
    sd[b + "attn.qkv.weight"] = r(b + "attn.qkv.weight.t", [dim, 3 * dim]).t()
    sd[b + "attn.qkv.bias"] = r(b + "attn.qkv.bias", [3 * dim])
    sd[b + "attn.proj.weight"] = r(b + "attn.proj.weight", [dim, dim])
    sd[b + "attn.proj.bias"] = r(b + "attn.proj.bias", [dim])
    sd[b + "norm2.weight"] = r(b + "norm2.weight", [dim])
    sd[b + "norm2.bias"] = r(b + "norm2.bias", [dim])
    sd[b + "mlp.fc1.weight"] = r(b + "mlp.fc1.weight", [4 * dim, dim])
    sd[b + "mlp.fc1.bias"] = r(b + "mlp.fc1.bias", [4 * dim])
    sd[b + "mlp.fc2.weight"] = r(b + "mlp.fc2.weight", [dim, 4 * dim])
    sd[b + "mlp.fc2.bias"] = r(b + "mlp.fc2.bias", [dim])
    # Half and bf16 tensors (an fp16 run's weights would be f32, but files in the wild vary).
    sd[prefix + "backbone.norm.weight"] = r(prefix + "backbone.norm.weight", [dim]).half()
    sd[prefix + "backbone.norm.bias"] = r(prefix + "backbone.norm.bias", [dim]).bfloat16()
    h = prefix + "head."
    sd[h + "mlp.0.weight"] = r(h + "mlp.0.weight", [heads_hidden, dim])
    sd[h + "mlp.0.bias"] = r(h + "mlp.0.bias", [heads_hidden])
    sd[h + "mlp.2.weight"] = r(h + "mlp.2.weight", [heads_hidden, heads_hidden])
    sd[h + "mlp.2.bias"] = r(h + "mlp.2.bias", [heads_hidden])
    sd[h + "mlp.4.weight"] = r(h + "mlp.4.weight", [4, heads_hidden])
    sd[h + "mlp.4.bias"] = r(h + "mlp.4.bias", [4])
    sd[h + "last_layer.weight_g"] = torch.ones(10, 1)
    sd[h + "last_layer.weight_v"] = r(h + "last_layer.weight_v", [10, 4])
    return sd


def dino_like():
    args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=False,
                              momentum_teacher=0.996, use_fp16=True, lr=0.0005, epochs=800,
                              global_crops_scale=(0.4, 1.0), data_path="/path/to/imagenet/train",
                              dist_url="env://", seed=0, local_crops_number=10, optimizer="adamw",
                              drop_path_rate=0.1, weight_decay_end=0.4, clip_grad=0.0, gpu=None)
    return {
        # The student is DDP-wrapped (module.*); the ViT teacher is not.
        "student": vit_part("module."),
        "teacher": vit_part(""),
        "optimizer": {
            "state": {0: {"step": torch.tensor(5.0), "exp_avg": r("opt.exp_avg", [1, 1, 4]),
                          "exp_avg_sq": r("opt.exp_avg_sq", [1, 1, 4]).abs()}},
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.04,
                              "amsgrad": False, "params": [0]}],
        },
        "epoch": 800,
        "args": args,
        "dino_loss": {"center": r("dino_loss.center", [1, 10])},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                        "growth_interval": 2000, "_growth_tracker": 3},
    }


def collect(prefix, obj, out):
    """Every tensor in obj as a contiguous float32 copy, keyed '<prefix>/<path>/<key>'."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().to(torch.float32).contiguous().clone()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            collect(f"{prefix}/{k}", v, out)


def key_sets():
    import timm
    import torchvision

    res = torchvision.models.resnet50()
    vit = timm.create_model("vit_small_patch16_224", pretrained=False)
    return {
        "resnet50": [[k, list(v.shape)] for k, v in res.state_dict().items()],
        "vit_small_patch16_224": [[k, list(v.shape)] for k, v in vit.state_dict().items()],
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    values = {}
    swav = swav_like()
    dino = dino_like()
    for name, obj, zipped in [("swav_like.pth", swav, True), ("swav_like_legacy.pth", swav, False),
                              ("dino_like.pth", dino, True)]:
        path = os.path.join(OUT, name)
        torch.save(obj, path, _use_new_zipfile_serialization=zipped)
        print(f"wrote {path}: {os.path.getsize(path)} bytes")
    collect("swav", swav, values)
    collect("dino", dino, values)
    from safetensors.torch import save_file

    path = os.path.join(OUT, "pth_values.safetensors")
    save_file(values, path)
    print(f"wrote {path}: {len(values)} tensors, {os.path.getsize(path)} bytes")
    x = r("x", [3, 5])
    path = os.path.join(OUT, "dtypes.safetensors")
    save_file({"f32": x, "f64": x.double(), "f16": x.half(), "bf16": x.bfloat16()}, path)
    print(f"wrote {path}: {os.path.getsize(path)} bytes")
    path = os.path.join(OUT, "torch_keys.json")
    with open(path, "w") as f:
        json.dump(key_sets(), f, separators=(",", ":"))
    print(f"wrote {path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
