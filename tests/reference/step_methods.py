"""PyTorch reference of two whole training iterations of Suave and of Daino, as the official code
runs them (spec §1.3–1.10, §2.4–2.5), for tests/train_step.rs.

Suave (resnet-tiny = torchvision's bottleneck ResNet with one block per stage and width 16, and
Suave's heads: hidden 32, feat 16, 10 prototypes = classes, the three online heads), per step:
renormalise the prototypes; one forward of [lab (2 clean + 2 mixup rows) | g1 | g2 | mix | l1 | l2]
grouped by resolution (one backbone pass at 32 px, one at 16 px; train-mode BN, no SyncBN on one
rank); queue scores with this step's prototypes, then the queue push; Sinkhorn (3 iterations,
eps 0.05) of [queue·Cᵀ; p_a] for a in {g1, g2}; swapped prediction, labelled CE (soft targets,
label smoothing), the mixed term against λ·q0 + (1−λ)·q1.flip(0) with the as-coded weight 1/T,
online heads on the detached features of the two clean labelled rows with weight L0/T; one
backward; LARS (apex LARC semantics) with the per-iteration warm-up rate. The queue starts
pre-filled (L2-normalised rows), so the queue path is used from the first step.

Daino (vit-tiny: patch 4, dim 96, depth 4, 3 heads, 32-px grid; DINOHead hidden 32, bottleneck 16,
10 outputs, trainable weight_g), per step: teacher (a copy of the student) on the two globals;
student (drop path 0) on [lab | g1 | g2 | l1 | l2] (32-px and 16-px passes; the 16-px pass uses
DINO's interpolate_pos_encoding with the +0.1); DINOLoss with the teacher temperature of the epoch,
then the centre update; the labelled CE; AdamW over DINO's two groups with the cosine lr and wd;
the teacher EMA with the cosine momentum.

Both run twice (iterations 3 and 4 of a 5-iteration epoch, in the warm-up so the rate is
non-zero), in float64 (the reference) and float32 (to measure PyTorch's own f32 error). Weights:
common.reference_fill(seed); inputs: common.randn. Fixtures hold, per step s (s0, s1), in the
engine's layout (conv weights O×KH×KW×I, weight_g [out]): the loss terms, every parameter's
gradient and update (after − before the step) as its norm, NPROJ projections onto
common.randn(SEED, "proj{j}.<name>") and, for tensors of at most FULL_MAX elements, in full;
BN running statistics (Suave), the teacher's update and the centre (Daino); and the relative error
of PyTorch's f32 gradients against f64 (`f32err`).

Run from the repository root: python3 tests/reference/step_methods.py
"""
import math
import os
import sys

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from methods import DINOLoss, distributed_sinkhorn  # noqa: E402
from model_resnet import SuaveNet  # noqa: E402
from optim import cosine_scheduler, get_params_groups, suave_lr_schedule, teacher_temp_schedule  # noqa: E402

SEED = 5
NPROJ = 4
FULL_MAX = 256
K = 10
BS, LAB = 4, 2  # unlabelled images, clean labelled images (LAB more mixup rows: "extend")
GLOBAL, LOCAL = 32, 16
N_ITER, EPOCHS, WARMUP = 5, 2, 1  # iterations per epoch, epochs, warm-up epochs
ITERS = [3, 4]
LAB_LAMBDA = [0.7, 0.4]  # λ of the labelled mixup rows, per step
MIX_LAMBDA = [0.35, 0.8]  # λ of the unlabelled mixed view, per step
torch.set_num_threads(2)


# ------------------------------------------------------------------ shared
def engine_layout(name, x):
    x = x.detach()
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1)  # OIHW -> O KH KW I
    if name.endswith("weight_g"):
        return x.reshape(-1)
    return x


def summarise(out, key, name, x):
    """Norm, projections and (small tensors) the full value of x (engine layout)."""
    x = engine_layout(name, x).double().contiguous()
    flat = x.flatten()
    out[f"{key}.norm.{name}"] = flat.norm().reshape(1)
    proj = [torch.from_numpy(common.randn(SEED, f"proj{j}.{name}", list(x.shape))).double().flatten() @ flat
            for j in range(NPROJ)]
    out[f"{key}.proj.{name}"] = torch.stack(proj)
    if flat.numel() <= FULL_MAX:
        out[f"{key}.full.{name}"] = x.float()


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def inputs(prefix, s, shapes, dtype):
    return {n: common.nhwc_to_nchw(common.t(common.randn(SEED, f"{prefix}.s{s}.{n}", sh))).to(dtype)
            for n, sh in shapes.items()}


def lab_targets(s, dtype):
    """Labels of the clean rows and the "extend" soft targets [one_hot(y); λ y + (1−λ) y.flip(0)]."""
    y = torch.tensor([(3 * s + 2 * i + 1) % K for i in range(LAB)])
    oh = F.one_hot(y, K).to(dtype)
    lam = LAB_LAMBDA[s]
    return y, torch.cat([oh, lam * oh + (1 - lam) * oh.flip(0)])


def unlab_labels(s):
    return [(5 * s + 3 * i) % K for i in range(BS)]


# ------------------------------------------------------------------ Suave
class TinySuaveNet(nn.Module):
    """resnet-tiny (torchvision Bottleneck, [1,1,1,1], width 16) with the official Suave heads;
    forward methods borrowed from model_resnet.SuaveNet (the official forward)."""

    forward_backbone = SuaveNet.forward_backbone
    forward_head = SuaveNet.forward_head
    forward = SuaveNet.forward

    def __init__(self, width=16, hidden=32, out_dim=16, n_prototypes=K, n_classes=K):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for i in range(4):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            ds = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            setattr(self, f"layer{i + 1}", nn.Sequential(Bottleneck(inplanes, planes, stride, ds)))
            inplanes = planes * 4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        feat = inplanes
        self.projection_head = nn.ModuleList(
            [nn.Sequential(nn.Linear(feat, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)),
             nn.Linear(hidden, out_dim)])
        self.cls_heads = nn.ModuleList(
            [nn.Linear(feat, n_classes), nn.Linear(hidden, n_classes), nn.Linear(out_dim, n_classes)])
        self.prototypes = nn.Linear(out_dim, n_prototypes, bias=False)


SUAVE = dict(base_lr=0.6, final_lr=0.0006, wd=1e-6, tau=0.1, ls=0.01, eta=0.001, queue_rows=8, feat=16)


def lars_step(model, lr, bufs):
    """apex LARC(SGD(momentum 0.9), trust 0.001, clip=False), wd 1e-6, every parameter (spec §1.10)."""
    wd, eta = SUAVE["wd"], SUAVE["eta"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            g = p.grad
            pn, gn = p.norm(), g.norm()
            if pn != 0 and gn != 0:
                d = (g + wd * p) * (eta * pn / (gn + pn * wd + 1e-8))
            else:
                d = g.clone()
            bufs[name] = d if name not in bufs else 0.9 * bufs[name] + d
            p.sub_(lr * bufs[name])


def suave_run(dtype):
    model = TinySuaveNet().to(dtype)
    common.reference_fill(model, SEED)
    queue = torch.from_numpy(common.randn(SEED, "suave.queue", [2, SUAVE["queue_rows"], SUAVE["feat"]])).to(dtype)
    queue = F.normalize(queue, dim=2)
    queue0 = queue.clone()
    lrs = suave_lr_schedule(SUAVE["base_lr"], SUAVE["final_lr"], EPOCHS, N_ITER, WARMUP, 0.0)
    bufs, res = {}, []
    tau, ls = SUAVE["tau"], SUAVE["ls"]
    for s, it in enumerate(ITERS):
        model.train()
        with torch.no_grad():  # main L571-575
            model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1, p=2))
        model.zero_grad(set_to_none=True)
        x = inputs("suave", s, {
            "lab": [2 * LAB, GLOBAL, GLOBAL, 3], "g1": [BS, GLOBAL, GLOBAL, 3], "g2": [BS, GLOBAL, GLOBAL, 3],
            "mix": [BS, GLOBAL, GLOBAL, 3], "l1": [BS, LOCAL, LOCAL, 3], "l2": [BS, LOCAL, LOCAL, 3]}, dtype)
        y, targets = lab_targets(s, dtype)
        lab_bs = 2 * LAB
        embedding, output, preds = model([x[n] for n in ("lab", "g1", "g2", "mix", "l1", "l2")])
        lab_out = output[:lab_bs]
        unlab = output[lab_bs:]
        emb = embedding[lab_bs:].detach()
        # the mixed view sits at index 2 of the unlabelled views: take it out (main L588-597)
        views = torch.cat([unlab[:2 * BS], unlab[3 * BS:]])
        emb = torch.cat([emb[:2 * BS], emb[3 * BS:]])
        mixed = unlab[2 * BS:3 * BS]
        V = views.shape[0] // BS
        codes = []
        loss_unlab = 0
        for i, a in enumerate([0, 1]):
            with torch.no_grad():
                o = views[BS * a:BS * (a + 1)].detach()
                if not torch.all(queue[i, -1, :] == 0):
                    o = torch.cat((queue[i] @ model.prototypes.weight.t(), o))
                queue[i, BS:] = queue[i, :-BS].clone()
                queue[i, :BS] = emb[a * BS:(a + 1) * BS]
                q = distributed_sinkhorn(o)[-BS:]
                codes.append(q)
            sub = 0
            for v in np.delete(np.arange(V), a):
                sub -= torch.mean(torch.sum(q * F.log_softmax(views[BS * v:BS * (v + 1)] / tau, dim=1), dim=1))
            loss_unlab += sub / (V - 1)
        loss_unlab /= 2
        lam = MIX_LAMBDA[s]
        qm = lam * codes[0] + (1 - lam) * codes[1].flip(0)
        loss_mixed = -torch.mean(torch.sum(qm * F.log_softmax(mixed / tau, dim=1), dim=1))
        loss_lab = F.cross_entropy(lab_out / tau, targets, label_smoothing=ls)
        loss_online = sum(F.cross_entropy(p[:LAB], y, label_smoothing=ls) for p in preds)
        n_mix = 1  # as coded: the number of mixed views (spec §1.8)
        T = V * BS + lab_bs + n_mix
        total = (V * BS / T) * loss_unlab + (lab_bs / T) * loss_lab + (n_mix / T) * loss_mixed \
            + (LAB / T) * loss_online
        total.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        lars_step(model, float(lrs[it]), bufs)
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        running = {n: b.detach().clone() for n, b in model.state_dict().items()
                   if n.endswith("running_mean") or n.endswith("running_var")}
        res.append(dict(
            loss={"train_loss": total, "train_unlab_loss": loss_unlab, "train_lab_loss": loss_lab,
                  "train_mixed_unlab_loss": loss_mixed, "train_online_loss": loss_online,
                  "lr": torch.tensor(float(lrs[it]))},
            grads=grads, delta={n: after[n] - before[n] for n in after}, running=running, after=after,
            queue=queue.clone(), codes=torch.cat(codes), queue0=queue0))
    return res


# ------------------------------------------------------------------ Daino
DAINO = dict(base_lr=0.002, final_lr=1e-5, wd=0.04, wd_end=0.4, momentum=0.99, tau=0.1, ls=0.01,
             warmup_temp=0.04, temp=0.07, warmup_temp_epochs=2, patch=4)


class DINOHead(nn.Module):
    """DINO's DINOHead (use_bn=False, nlayers 3), weight_g trainable (Daino's student)."""

    def __init__(self, in_dim, out_dim, hidden_dim=32, bottleneck_dim=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, qkv_bias=True,
            num_classes=0)
        self.head = DINOHead(96, K)


def interpolate_pos_encoding(m, x, w, h, patch):
    """DINO's VisionTransformer.interpolate_pos_encoding (w, h = NCHW dims 2, 3)."""
    npatch = x.shape[1] - 1
    N = m.pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return m.pos_embed
    class_pos_embed = m.pos_embed[:, 0]
    patch_pos_embed = m.pos_embed[:, 1:]
    dim = x.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def dino_backbone(m, x):
    """DINO's VisionTransformer.forward (drop path 0) on timm's modules."""
    B, _, w, h = x.shape
    t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat((m.cls_token.expand(B, -1, -1), t), dim=1)
    t = t + interpolate_pos_encoding(m, t, w, h, DAINO["patch"])
    for blk in m.blocks:
        t = t + blk.attn(blk.norm1(t))
        t = t + blk.mlp(blk.norm2(t))
    return m.norm(t)[:, 0]


def multicrop(model, crops):
    """DINO's MultiCropWrapper: one backbone pass per run of equal widths, head once."""
    idx = torch.cumsum(torch.unique_consecutive(torch.tensor([c.shape[-1] for c in crops]),
                                                return_counts=True)[1], 0)
    start, feats = 0, []
    for end in idx:
        feats.append(dino_backbone(model.backbone, torch.cat(crops[start:end])))
        start = end
    return model.head(torch.cat(feats))


def daino_run(dtype):
    student = Wrapper().to(dtype)
    common.reference_fill(student, SEED)
    teacher = Wrapper().to(dtype)  # a copy of the student (weight_norm modules cannot deepcopy)
    common.reference_fill(teacher, SEED)
    for p in teacher.parameters():
        p.requires_grad = False
    bs_lr = DAINO["base_lr"] * (BS * 1) / 256.
    lrs = cosine_scheduler(bs_lr, DAINO["final_lr"], EPOCHS, N_ITER, warmup_epochs=WARMUP)
    wds = cosine_scheduler(DAINO["wd"], DAINO["wd_end"], EPOCHS, N_ITER)
    moms = cosine_scheduler(DAINO["momentum"], 1, EPOCHS, N_ITER)
    temps = teacher_temp_schedule(DAINO["warmup_temp"], DAINO["temp"], DAINO["warmup_temp_epochs"], EPOCHS)
    V = 4
    crit = DINOLoss(K, V, student_temp=DAINO["tau"]).to(dtype)
    opt = torch.optim.AdamW(get_params_groups(student.named_parameters()), foreach=False)
    res = []
    for s, it in enumerate(ITERS):
        epoch = it // N_ITER
        x = inputs("daino", s, {
            "lab": [2 * LAB, GLOBAL, GLOBAL, 3], "g1": [BS, GLOBAL, GLOBAL, 3], "g2": [BS, GLOBAL, GLOBAL, 3],
            "l1": [BS, LOCAL, LOCAL, 3], "l2": [BS, LOCAL, LOCAL, 3]}, dtype)
        _, targets = lab_targets(s, dtype)
        lab_bs = 2 * LAB
        with torch.no_grad():
            t_out = multicrop(teacher, [x["g1"], x["g2"]])
        s_out = multicrop(student, [x[n] for n in ("lab", "g1", "g2", "l1", "l2")])
        loss_unlab = crit(s_out[lab_bs:], t_out, float(temps[epoch]))
        loss_lab = F.cross_entropy(s_out[:lab_bs] / DAINO["tau"], targets, label_smoothing=DAINO["ls"])
        T = V * BS + lab_bs
        total = (V * BS / T) * loss_unlab + (lab_bs / T) * loss_lab
        opt.zero_grad(set_to_none=True)
        total.backward()
        for i, g in enumerate(opt.param_groups):
            g["lr"] = float(lrs[it])
            if i == 0:
                g["weight_decay"] = float(wds[it])
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        t_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in student.named_parameters()}
        opt.step()
        m = float(moms[it])
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.data.mul_(m).add_((1 - m) * ps.detach().data)
        res.append(dict(
            loss={"train_loss": total, "train_unlab_loss": loss_unlab, "train_lab_loss": loss_lab,
                  "lr": torch.tensor(float(lrs[it])), "wd": torch.tensor(float(wds[it])),
                  "momentum": torch.tensor(m), "teacher_temp": torch.tensor(float(temps[epoch]))},
            grads=grads,
            delta={n: p.detach() - before[n] for n, p in student.named_parameters()},
            after={n: p.detach().clone() for n, p in student.named_parameters()},
            teacher={n: p.detach() - t_before[n] for n, p in teacher.named_parameters()},
            center=crit.center.detach().reshape(-1).clone()))
    return res


# ------------------------------------------------------------------ fixtures
def write(method, r64, r32):
    out, worst = {}, (0.0, "")
    if "queue0" in r64[0]:
        out["queue0"] = r64[0]["queue0"].float()
    for s, (a, b) in enumerate(zip(r64, r32)):
        p = f"s{s}"
        for k, v in a["loss"].items():
            out[f"{p}.loss.{k}"] = torch.as_tensor(v).double().reshape(1)
        for n, g in a["grads"].items():
            summarise(out, f"{p}.grad", n, g)
            e = rel(b["grads"][n], g)
            out[f"{p}.f32err.grad.{n}"] = torch.tensor([e], dtype=torch.float64)
            if g.norm() > 1e-9:  # a bias right before a train-mode BN has a zero gradient
                worst = max(worst, (e, f"{p} {n}"))
        for n, d in a["delta"].items():
            summarise(out, f"{p}.delta", n, d)
            # PyTorch's own f32 error of the updated value, relative to the value: an optimiser
            # that normalises per element (AdamW) or per tensor (LARS) turns the rounding noise
            # of an exactly-zero gradient (a key bias, a bias before a train-mode BN) into a
            # step of full size, so no f32 implementation can match f64 closer than this
            out[f"{p}.f32err.value.{n}"] = torch.tensor(
                [float((b["delta"][n].double() - d).norm() / a["after"][n].norm())], dtype=torch.float64)
        for n, d in a.get("teacher", {}).items():
            summarise(out, f"{p}.teacher", n, d)
        for n, v in a.get("running", {}).items():
            out[f"{p}.running.{n}"] = v.float()
        if "center" in a:
            out[f"{p}.center"] = a["center"].double()
        if "queue" in a:
            out[f"{p}.queue"] = a["queue"].float()
            out[f"{p}.codes"] = a["codes"].float()
        print(f"{method} step {s}: " + ", ".join(f"{k} {float(v):.6f}" for k, v in a["loss"].items()))
    print(f"{method}: PyTorch f32 vs f64, worst gradient relative error {worst[0]:.2e} ({worst[1]})")
    common.save(out, f"steps/{method}.safetensors")


def main():
    write("suave", suave_run(torch.float64), suave_run(torch.float32))
    write("daino", daino_run(torch.float64), daino_run(torch.float32))


if __name__ == "__main__":
    main()
