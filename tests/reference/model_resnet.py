"""PyTorch reference for src/models/resnet.rs + suave_head.rs: torchvision's ResNet-50 (fc removed)
with Suave's heads, mirroring the official module (`src/resnet50.py` of suave-daino) so that the
state-dict keys are the same: backbone at the top level, then `projection_head` (a ModuleList of
Sequential(Linear, BatchNorm1d, ReLU) and a Linear), `cls_heads` (three Linears), `prototypes`.

One multi-crop step, forward + backward, first in eval mode then in train mode, in float64:
inputs [lab 2x64px, view 2x64px, local 2x48px, local 2x48px] give two backbone passes (4 rows at
64 px, 4 rows at 48 px), as the official forward groups consecutive inputs of one size. (At 32 px
layer4 is 1x1 and train-mode BN normalises 4 values per channel: so ill-conditioned that PyTorch's
own f32 output is 1e-3 off its f64 output.) Weights: common.reference_fill (seed 11), then the
prototype rows are normalised as Suave does before every step. Upstream gradients on the prototype
scores and the three online heads' logits come from common.randn.

The same steps also run in float32, and the relative error of PyTorch's own f32 result against its
f64 result is stored for every output and gradient (`<mode>.f32err.*`): train-mode BN over a few
rows amplifies the backward ~100x and f32 rounding flips a few ReLU masks, so no f32
implementation matches f64 to 1e-3 there; the test bounds the engine by that measured error.

Stored (tests/fixtures/models/resnet.safetensors, read by tests/model_resnet.rs), <mode> = eval|train:
- <mode>.out.scores, .out.embedding, .out.online.{0,1,2}: the forward's outputs;
- for EVERY parameter: <mode>.grad_norm.<name> (‖g‖) and <mode>.grad_proj.<name> (3 dot products
  of g with common.randn(SEED, f"proj{j}.<name>", torch shape)), float64; the full gradient of a
  few small parameters as <mode>.grad.<name> (conv weights in the engine's O×KH×KW×I layout): all
  gradients in full would be ~100 MB;
- running.<name>: every BN running_mean / running_var after both steps (eval leaves them alone;
  the train step updates backbone BNs twice, one per pass, and the head's once);
- metadata: `torchvision_keys` (JSON [[name, shape]...] of torchvision.models.resnet50() without
  fc), `suave_keys` (the whole model), `resnet50_params_with_fc`, `resnet50_params_without_fc`.
Run from the repository root:  python3 tests/reference/model_resnet.py   (about a minute)
"""
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SEED = 11
N_PROTOTYPES = 10
N_CLASSES = 7
INPUTS = [("lab", [2, 64, 64, 3]), ("g1", [2, 64, 64, 3]), ("l1", [2, 48, 48, 3]), ("l2", [2, 48, 48, 3])]
N_PROJ = 3
FULL = [
    "conv1.weight",
    "bn1.weight",
    "layer1.0.downsample.0.weight",
    "layer3.0.downsample.1.bias",
    "layer4.2.bn3.weight",
    "projection_head.0.1.weight",
    "cls_heads.2.weight",
    "prototypes.weight",
]


class SuaveNet(torchvision.models.resnet.ResNet):
    """torchvision ResNet-50 without fc, plus the official Suave heads (same attribute order)."""

    def __init__(self, hidden=2048, out_dim=128, n_prototypes=1000, n_classes=1000):
        super().__init__(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3])
        del self.fc
        # official init (torchvision's is the same): kaiming fan_out convs, BN 1/0
        feat = 2048
        self.projection_head = nn.ModuleList(
            [nn.Sequential(nn.Linear(feat, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)),
             nn.Linear(hidden, out_dim)]
        )
        self.cls_heads = nn.ModuleList(
            [nn.Linear(feat, n_classes), nn.Linear(hidden, n_classes), nn.Linear(out_dim, n_classes)]
        )
        self.prototypes = nn.Linear(out_dim, n_prototypes, bias=False)

    def forward_backbone(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward_head(self, x, lab_bs):
        # as the official forward_head with multihead eval, no ensemble, normalize=True
        preds = []
        for i, projector in enumerate(self.projection_head):
            preds.append(self.cls_heads[i](x[:lab_bs].detach()))
            x = projector(x)
        preds.append(self.cls_heads[-1](x[:lab_bs].detach()))
        x = F.normalize(x, dim=1, p=2)
        return x, self.prototypes(x), preds

    def forward(self, inputs):
        # as the official forward: consecutive inputs of one size form one backbone pass
        idx = torch.cumsum(torch.unique_consecutive(torch.tensor([i.shape[-1] for i in inputs]),
                                                    return_counts=True)[1], 0)
        start, outs = 0, []
        for end in idx:
            outs.append(self.forward_backbone(torch.cat(inputs[start:end])))
            start = end
        return self.forward_head(torch.cat(outs), lab_bs=inputs[0].size(0))


def keys_with_shapes(module):
    return [[k, list(v.shape)] for k, v in module.state_dict().items()]


def build(dtype):
    model = SuaveNet(n_prototypes=N_PROTOTYPES, n_classes=N_CLASSES).to(dtype)
    common.reference_fill(model, SEED)
    with torch.no_grad():
        model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1, p=2))
    return model


def step(model, dtype, train):
    """One forward + backward of the multi-crop step; returns outputs and {name: grad}."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    inputs = [common.nhwc_to_nchw(common.t(common.randn(SEED, f"x.{n}", s))).to(dtype) for n, s in INPUTS]
    z, scores, preds = model(inputs)
    d_scores = common.t(common.randn(SEED, "d.scores", list(scores.shape))).to(dtype)
    d_online = [common.t(common.randn(SEED, f"d.online.{i}", list(p.shape))).to(dtype) for i, p in enumerate(preds)]
    torch.autograd.backward([scores] + preds, [d_scores] + d_online)
    outs = {"scores": scores.detach(), "embedding": z.detach()}
    outs.update({f"online.{i}": p.detach() for i, p in enumerate(preds)})
    return outs, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def rel(a, b):
    a, b = a.double(), b.double()
    return (a - b).norm() / b.norm().clamp_min(1e-300)


def main():
    torch.set_num_threads(2)
    tv = torchvision.models.resnet50()
    with_fc = sum(p.numel() for p in tv.parameters())
    tv.fc = nn.Identity()
    without_fc = sum(p.numel() for p in tv.parameters())
    tv_keys = keys_with_shapes(tv)

    model = build(torch.float64)
    bb_keys = [k for k, _ in keys_with_shapes(model)][: len(tv_keys)]
    assert bb_keys == [k for k, _ in tv_keys], "backbone keys differ from torchvision's"
    model32 = build(torch.float32)

    out, f64 = {}, {}
    # eval first: it leaves the running statistics untouched for the train step
    for mode, train in (("eval", False), ("train", True)):
        outs, grads = step(model, torch.float64, train)
        outs32, grads32 = step(model32, torch.float32, train)
        for k, v in outs.items():
            out[f"{mode}.out.{k}"] = v
            f64[f"{mode}.f32err.out.{k}"] = rel(outs32[k], v).reshape(1)
        for name, g in grads.items():
            proj = [(g * common.t(common.randn(SEED, f"proj{j}.{name}", list(g.shape))).double()).sum()
                    for j in range(N_PROJ)]
            f64[f"{mode}.grad_proj.{name}"] = torch.stack(proj)
            f64[f"{mode}.grad_norm.{name}"] = g.norm().reshape(1)
            f64[f"{mode}.f32err.grad.{name}"] = rel(grads32[name], g).reshape(1)
            if name in FULL:
                out[f"{mode}.grad.{name}"] = g.permute(0, 2, 3, 1) if g.dim() == 4 else g
    for name, b in model.state_dict().items():
        if name.endswith("running_mean") or name.endswith("running_var"):
            out[f"running.{name}"] = b

    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}
    tensors.update({k: v.detach().to(torch.float64).contiguous() for k, v in f64.items()})
    meta = {
        "torchvision_keys": json.dumps(tv_keys),
        "suave_keys": json.dumps(keys_with_shapes(model)),
        "resnet50_params_with_fc": str(with_fc),
        "resnet50_params_without_fc": str(without_fc),
    }
    path = os.path.join(common.FIXTURES, "models", "resnet.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path, metadata=meta)
    print(f"wrote {path}: {len(tensors)} tensors, {os.path.getsize(path)} bytes; "
          f"resnet50 params {with_fc} with fc, {without_fc} without")
    worst = sorted((v.item(), k) for k, v in f64.items() if ".f32err." in k and "projection_head.0.0.bias" not in k)
    print("PyTorch f32 vs f64, largest relative errors:", worst[-3:])


if __name__ == "__main__":
    main()
