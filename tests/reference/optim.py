"""Reference values for src/optim: schedules, LARS, AdamW and the teacher EMA.

Run from the repository root: `python3 tests/reference/optim.py`. Writes
tests/fixtures/optim/{schedules,steps}.safetensors.

* Schedules: numpy copies of the official code (DINO utils.cosine_scheduler; the Suave/SwAV
  learning-rate array built inline in main_suave.py; DINOLoss.teacher_temp_schedule), stored in
  float64 at selected iterations of the real configurations (spec §1.10, §2.4, §2.5).
* LARS: apex LARC(SGD, trust_coefficient=eta, clip=False) semantics as in spec §1.10: the gradient
  is rewritten in place, then torch.optim.SGD(momentum 0.9) takes the step. A second, literal
  implementation of the spec's formulas cross-checks it.
* AdamW: torch.optim.AdamW (single-tensor path) over DINO's get_params_groups, with lr and the
  group-0 weight decay changed every step as DINO's training loop does.
* EMA: DINO's `param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)` over parameters only.
Gradients, initial values and student weights come from the shared generator (common.randn).
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import FIXTURES, randn, save  # noqa: E402

torch.set_num_threads(1)
STEPS = 5


# ---------------------------------------------------------------- schedules (numpy, official)
def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0):
    """DINO utils.py, verbatim logic."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def suave_lr_schedule(base_lr, final_lr, epochs, n, warmup_epochs, start_warmup):
    """main_suave.py / main_swav.py, inline in the original."""
    warmup_lr_schedule = np.linspace(start_warmup, base_lr, n * warmup_epochs)
    iters = np.arange(n * (epochs - warmup_epochs))
    cosine_lr_schedule = np.array([final_lr + 0.5 * (base_lr - final_lr) * (
        1 + math.cos(math.pi * t / (n * (epochs - warmup_epochs)))) for t in iters])
    return np.concatenate((warmup_lr_schedule, cosine_lr_schedule))


def teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """DINOLoss.__init__."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


def sample(sched, n_warm, rng):
    n = len(sched)
    edges = {0, 1, 2, n - 1, n - 2}
    if n_warm > 0:
        edges |= {n_warm - 2, n_warm - 1, n_warm, n_warm + 1}
    edges = {i for i in edges if 0 <= i < n}
    idx = np.array(sorted(edges | set(rng.integers(0, n, 200).tolist())), dtype=np.int64)
    return idx, sched[idx].astype(np.float64)


def schedules():
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    out = {}
    cases = {
        # Suave train scripts: 0.4 -> 0.001, 100 epochs, 5 warm-up, N = 5004, from 0.
        "suave": (suave_lr_schedule(0.4, 0.001, 100, 5004, 5, 0.0), 5 * 5004),
        # SwAV 800-epoch recipe: 4.8 -> 0.0048, 10 warm-up epochs from 0.3 (N = 312).
        "swav": (suave_lr_schedule(4.8, 0.0048, 800, 312, 10, 0.3), 10 * 312),
        # Daino: lr 0.00024 * (64 * 16) / 256, min 1e-5, 60 epochs, 4 warm-up, N = 1251.
        "dino_lr": (cosine_scheduler(0.00024 * (64 * 16) / 256., 1e-5, 60, 1251, warmup_epochs=4), 4 * 1251),
        "dino_wd": (cosine_scheduler(0.04, 0.4, 60, 1251), 0),
        "dino_momentum": (cosine_scheduler(0.990, 1, 60, 1251), 0),
    }
    for k, (s, w) in cases.items():
        idx, val = sample(s, w, rng)
        out[f"{k}.idx"] = idx
        out[f"{k}.val"] = val
    # Small schedules in full, including start_warmup != 0 and the Suave form == DINO's.
    small = cosine_scheduler(1.0, 0.1, 3, 7, 1, 0.5)
    assert np.array_equal(small, suave_lr_schedule(1.0, 0.1, 3, 7, 1, 0.5))
    out["small.val"] = small
    out["temp_daino.val"] = teacher_temp_schedule(0.04, 0.07, 10, 60)
    out["temp_dino.val"] = teacher_temp_schedule(0.04, 0.04, 0, 100)
    path = os.path.join(FIXTURES, "optim", "schedules.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, path)
    print(f"wrote {path}")


# ---------------------------------------------------------------- parameters
# (name, engine shape, PyTorch shape, trainable). weight_g is [out] in the engine, [out,1] in PyTorch.
PARAMS = [
    ("conv.weight", [4, 3, 3, 3], [4, 3, 3, 3], True),
    ("fc.bias", [6], [6], True),           # starts at zero: ||p|| = 0 on LARS's first step
    ("fc.weight", [5, 4], [5, 4], True),   # zero gradient at step 2 (momentum keeps moving it)
    ("norm.weight", [6], [6], True),       # 1-D: AdamW group 1
    ("still.weight", [3, 2], [3, 2], True),  # zero gradient at every step
    ("frozen.weight", [2, 2], [2, 2], False),
    ("head.last_layer.weight_g", [5], [5, 1], True),
]
LARS_LR = [0.1, 0.2, 0.3, 0.25, 0.05]
ADAMW_LR = [0.01, 0.02, 0.05, 0.03, 0.001]
ADAMW_WD = [0.04, 0.1, 0.4, 0.2, 0.3]
EMA_M = [0.99, 0.995, 0.9, 0.5, 1.0]


def init_params():
    ps = {}
    for name, _, tshape, trainable in PARAMS:
        if name == "fc.bias":
            v = np.zeros(tshape, dtype=np.float32)
        else:
            v = randn(0, f"init.{name}", tshape)
        ps[name] = torch.nn.Parameter(torch.from_numpy(v.reshape(tshape)), requires_grad=trainable)
    return ps


def set_grads(ps, step):
    for name, eshape, tshape, trainable in PARAMS:
        p = ps[name]
        if not trainable:
            p.grad = None
            continue
        g = randn(0, f"grad.{step}.{name}", eshape).reshape(tshape)
        if name == "still.weight" or (name == "fc.weight" and step == 2):
            g = np.zeros(tshape, dtype=np.float32)
        p.grad = torch.from_numpy(g.copy())


def lars_run(eta, wd, tag, out):
    ps = init_params()
    opt = torch.optim.SGD([ps[n] for n, *_ in PARAMS], lr=0.0, momentum=0.9, weight_decay=0)
    # Literal spec implementation for a cross-check.
    lit = {n: ps[n].detach().clone() for n, *_ in PARAMS}
    lit_buf = {}
    for step in range(STEPS):
        set_grads(ps, step)
        with torch.no_grad():
            for name, *_ in PARAMS:
                p = ps[name]
                if p.grad is None:
                    continue
                # apex LARC, clip=False
                param_norm = torch.norm(p.data)
                grad_norm = torch.norm(p.grad.data)
                if param_norm != 0 and grad_norm != 0:
                    adaptive_lr = eta * param_norm / (grad_norm + param_norm * wd + 1e-8)
                    p.grad.data += wd * p.data
                    p.grad.data *= adaptive_lr
                # literal: same formulas on float64 copies
                g = set_grad_literal(name, step, p.shape)
                q = lit[name].double()
                pn, gn = q.norm(), g.norm()
                if pn != 0 and gn != 0:
                    d = (g + wd * q) * (eta * pn / (gn + wd * pn + 1e-8))
                else:
                    d = g
                lit_buf[name] = d if name not in lit_buf else 0.9 * lit_buf[name] + d
                lit[name] = q - LARS_LR[step] * lit_buf[name]
            opt.param_groups[0]["lr"] = LARS_LR[step]
        opt.step()
        for name, eshape, *_ in PARAMS:
            out[f"{tag}.{step}.{name}"] = ps[name].detach().reshape(eshape).clone()
            st = opt.state.get(ps[name], {})
            if "momentum_buffer" in st:
                out[f"{tag}.buf.{step}.{name}"] = st["momentum_buffer"].reshape(eshape).clone()
    for name, *_ in PARAMS:
        e = (lit[name].float() - ps[name].detach()).norm() / max(ps[name].detach().norm(), 1e-30)
        assert e < 1e-6, (tag, name, float(e))
        print(f"{tag} {name}: SGD-based vs literal rel err {float(e):.2e}")


def set_grad_literal(name, step, tshape):
    eshape = next(e for n, e, *_ in PARAMS if n == name)
    if name == "still.weight" or (name == "fc.weight" and step == 2):
        return torch.zeros(tshape, dtype=torch.float64)
    return torch.from_numpy(randn(0, f"grad.{step}.{name}", eshape).reshape(tshape)).double()


def get_params_groups(named):
    """DINO utils.get_params_groups."""
    regularized = []
    not_regularized = []
    for name, param in named:
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.}]


def adamw_run(out):
    ps = init_params()
    opt = torch.optim.AdamW(get_params_groups([(n, ps[n]) for n, *_ in PARAMS]), foreach=False)
    for step in range(STEPS):
        set_grads(ps, step)
        for i, g in enumerate(opt.param_groups):
            g["lr"] = ADAMW_LR[step]
            if i == 0:
                g["weight_decay"] = ADAMW_WD[step]
        opt.step()
        for name, eshape, *_ in PARAMS:
            out[f"adamw.{step}.{name}"] = ps[name].detach().reshape(eshape).clone()
            st = opt.state.get(ps[name], {})
            if "exp_avg" in st:
                out[f"adamw.m.{step}.{name}"] = st["exp_avg"].reshape(eshape).clone()
                out[f"adamw.v.{step}.{name}"] = st["exp_avg_sq"].reshape(eshape).clone()


def ema_run(out):
    # Teacher parameters (all frozen in DINO; the EMA covers them regardless of requires_grad).
    teacher = {n: torch.from_numpy(randn(0, f"teacher.{n}", t)) for n, _, t, _ in PARAMS}
    for step in range(STEPS):
        student = {n: torch.from_numpy(randn(0, f"student.{step}.{n}", t)) for n, _, t, _ in PARAMS}
        m = EMA_M[step]
        with torch.no_grad():
            for name, *_ in PARAMS:
                teacher[name].mul_(m).add_((1 - m) * student[name].detach().data)
        for name, eshape, *_ in PARAMS:
            out[f"ema.{step}.{name}"] = teacher[name].reshape(eshape).clone()


def main():
    schedules()
    out = {}
    lars_run(0.001, 1e-6, "lars", out)       # Suave's setting
    lars_run(0.5, 0.05, "lars_big", out)    # large eta and wd: every term visible at 1e-6
    adamw_run(out)
    ema_run(out)
    save(out, "optim/steps.safetensors")


if __name__ == "__main__":
    main()
