"""PyTorch reference for the ViT-S/16 + Daino head model (src/models/vit.rs, daino_head.rs).

Backbone: timm's `vit_small_patch16_224(num_classes=0)`. Its state-dict keys and order are the
same as DINO's `vision_transformer.py::vit_small` (cls_token, pos_embed, patch_embed.proj.*,
blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*, norm.*); timm adds only
parameter-free identities (ls1/ls2, q_norm/k_norm, attn.norm, mlp.norm, fc_norm, head). The
forward used here is DINO's (prepare_tokens with DINO's interpolate_pos_encoding, written below
as in DINO's code: timm resamples with `size=` and without the +0.1, which gives other numbers
at 96 px), run on timm's modules. Head: DINO's DINOHead(use_bn=False, norm_last_layer=False)
with the old `nn.utils.weight_norm` (keys weight_g, weight_v), Daino's out_dim 1000. Both sit
in a module with attributes `backbone` and `head`, as DINO's MultiCropWrapper, so the keys (and
hence the shared reference fill) are `backbone.*`, `head.*`.

Runs, both with seed 0 weights from common.reference_fill:
1. drop path 0 (exact parity): crops [2x3x224x224, 2x3x96x96] (two backbone passes, head once);
   upstream gradient of the logits from common.randn.
2. drop path rate 0.5 (blocks 0 .. 11 at linspace(0, 0.5, 12)) on 4x3x96x96, with the engine's
   masks: the engine draws `drop_path_mask(rng, B, p)` = (uniform < 1 − p) per sample from
   Rng::named(0, "drop_path"), block by block, attention branch then MLP branch, blocks with
   p = 0 drawing nothing; common.uniform replays that stream here.

Stored (parameter gradients are ~27 M values, far over the size budget): outputs; for every
parameter its gradient norm and 4 projections onto common.randn(0, f"proj{j}.{name}") in the
PyTorch layout; full gradients of a few representative parameters; timm's key list (index and
shape per key) and parameter count. Run from the repository root:
    python3 tests/reference/model_vit.py
"""
import math
import os
import sys
import warnings

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SEED = 0
OUT_DIM = 1000
NPROJ = 4
FULL = [
    "backbone.cls_token",
    "backbone.pos_embed",
    "backbone.patch_embed.proj.bias",
    "backbone.blocks.0.norm1.weight",
    "backbone.blocks.5.attn.qkv.bias",
    "backbone.blocks.11.mlp.fc2.bias",
    "backbone.norm.weight",
    "head.mlp.4.bias",
    "head.last_layer.weight_g",
]
torch.set_num_threads(2)
warnings.filterwarnings("ignore", category=FutureWarning)


class DINOHead(nn.Module):
    """DINO's DINOHead (vision_transformer.py), use_bn=False."""

    def __init__(self, in_dim, out_dim, norm_last_layer=True, nlayers=3, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
        self.head = DINOHead(384, OUT_DIM, norm_last_layer=False)


def interpolate_pos_encoding(m, x, w, h):
    """DINO's VisionTransformer.interpolate_pos_encoding (w, h = NCHW dims 2, 3)."""
    npatch = x.shape[1] - 1
    N = m.pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return m.pos_embed
    class_pos_embed = m.pos_embed[:, 0]
    patch_pos_embed = m.pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // 16
    h0 = h // 16
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


class MaskStream:
    """Replays the engine's drop-path masks: uniforms of Rng::named(seed, name), in order."""

    def __init__(self, seed, name):
        self.u = common.uniform(seed, name, 1 << 12)
        self.i = 0
        self.dropped = 0

    def apply(self, x, p):
        if p == 0.0:
            return x
        b = x.shape[0]
        u = self.u[self.i : self.i + b]
        self.i += b
        keep = 1.0 - p
        mask = torch.tensor((u < keep).astype(np.float32)).reshape(b, 1, 1)
        self.dropped += int((u >= keep).sum())
        return x * mask / keep


def dino_backbone(m, x, rate=0.0, masks=None):
    """DINO's VisionTransformer.forward on timm's modules; x NCHW."""
    B, nc, w, h = x.shape
    t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat((m.cls_token.expand(B, -1, -1), t), dim=1)
    t = t + interpolate_pos_encoding(m, t, w, h)
    depth = len(m.blocks)
    for i, blk in enumerate(m.blocks):
        # torch.linspace(0, rate, depth)[i].item(): a float32 value
        p = float(np.float32(rate * i / (depth - 1)))
        dp = (lambda y: masks.apply(y, p)) if masks is not None else (lambda y: y)
        t = t + dp(blk.attn(blk.norm1(t)))
        t = t + dp(blk.mlp(blk.norm2(t)))
    t = m.norm(t)
    return t[:, 0]


def image(name, shape):
    return common.nhwc_to_nchw(common.t(common.randn(SEED, name, shape)))


def grad_summaries(model, prefix, out):
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g = g.detach().double().flatten()
        projs = [
            float(torch.from_numpy(common.randn(SEED, f"proj{j}.{name}", list(p.shape))).double().flatten() @ g)
            for j in range(NPROJ)
        ]
        out[f"{prefix}proj.{name}"] = torch.tensor(projs, dtype=torch.float64)
        out[f"{prefix}norm.{name}"] = torch.tensor([float(g.norm())], dtype=torch.float64)


model = Wrapper()
common.reference_fill(model, SEED)
out = {}

# timm's key list, parameter count; checked against the engine's ViT with prefix "".
sd = model.backbone.state_dict()
for i, (k, v) in enumerate(sd.items()):
    out[f"timm_key.{k}"] = torch.tensor([i] + list(v.shape), dtype=torch.float64)
n_params = sum(p.numel() for p in model.backbone.parameters())
out["timm_num_params"] = torch.tensor([n_params], dtype=torch.float64)
print("timm vit_small_patch16_224 num_classes=0:", n_params, "parameters,", len(sd), "tensors")

# 1. drop path 0.
x224 = image("x224", [2, 224, 224, 3])
x96 = image("x96", [2, 96, 96, 3])
feats = torch.cat([dino_backbone(model.backbone, x224), dino_backbone(model.backbone, x96)])
logits = model.head(feats)
dlogits = common.t(common.randn(SEED, "dlogits", list(logits.shape)))
(logits * dlogits).sum().backward()
out["features"] = feats
out["logits"] = logits
grad_summaries(model, "", out)
params = dict(model.named_parameters())
for name in FULL:
    out[f"grad.{name}"] = params[name].grad
model.zero_grad()

# 2. drop path 0.5 with the engine's masks.
xdp = image("xdp", [4, 96, 96, 3])
masks = MaskStream(SEED, "drop_path")
feats = dino_backbone(model.backbone, xdp, rate=0.5, masks=masks)
logits = model.head(feats)
dl = common.t(common.randn(SEED, "dp_dlogits", list(logits.shape)))
(logits * dl).sum().backward()
out["dp.features"] = feats
out["dp.logits"] = logits
out["dp.draws"] = torch.tensor([masks.i, masks.dropped], dtype=torch.float64)
print(f"drop path run: {masks.i} mask draws, {masks.dropped} dropped")
grad_summaries(model, "dp.", out)

common.save(out, "models/vit.safetensors")
