"""PyTorch reference of the method losses (spec §1.4–1.8, §2.4): SwAV's distributed_sinkhorn
(single rank), Suave's loss loop as in main_suave.py, and DINO's DINOLoss with Daino's labelled
term. Inputs come from the shared generator (common.randn / common.rand); the fixture stores
codes, losses, autograd gradients and the updated centre.

Run from the repository root: python3 tests/reference/methods.py
"""
import numpy as np
import torch
import torch.nn.functional as F

from common import rand, randn, save

SEED = 21


def distributed_sinkhorn(out, epsilon=0.05, sinkhorn_iterations=3, world_size=1):
    # Verbatim logic of SwAV main_swav.py L354-376 (all_reduce is the identity on one rank).
    Q = torch.exp(out / epsilon).t()
    B = Q.shape[1] * world_size
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for it in range(sinkhorn_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def sinkhorn_cases(out):
    for name, shape in [("sk_a", [37, 11]), ("sk_b", [96, 10])]:
        s = torch.from_numpy(rand(SEED, name + ".s", shape, -1.0, 1.0))
        out[name + ".q"] = distributed_sinkhorn(s.clone())


def suave_case(out, name, use_queue, mixed_count):
    V, bs, K, qlen, lab_bs = 4, 6, 9, 12, 5
    tau, ls, lam = 0.1, 0.01, 0.3
    crops_for_assign = [0, 1]
    output = torch.from_numpy(rand(SEED, name + ".views", [V * bs, K], -1.0, 1.0)).requires_grad_()
    lab = torch.from_numpy(rand(SEED, name + ".lab", [lab_bs, K], -1.0, 1.0)).requires_grad_()
    mixed = torch.from_numpy(rand(SEED, name + ".mixed", [bs, K], -1.0, 1.0)).requires_grad_()
    y = torch.softmax(torch.from_numpy(randn(SEED, name + ".y", [lab_bs, K])) * 3, dim=1)
    queue_scores = [torch.from_numpy(rand(SEED, f"{name}.queue{i}", [qlen, K], -1.0, 1.0)) for i in range(2)]

    # main_suave.py L607-644: swapped prediction.
    loss_unlab = 0
    codes = []
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            o = output[bs * crop_id: bs * (crop_id + 1)].detach()
            if use_queue:
                o = torch.cat((queue_scores[i], o))
            q = distributed_sinkhorn(o)[-bs:]
            codes.append(q)
        subloss = 0
        for v in np.delete(np.arange(V), crop_id):
            x = output[bs * v: bs * (v + 1)] / tau
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss_unlab += subloss / (V - 1)
    loss_unlab /= len(crops_for_assign)
    # L646-655: mixed unlabelled view against mixed codes.
    qm = lam * codes[0] + (1 - lam) * codes[1].flip(0)
    loss_mixed = -torch.mean(torch.sum(qm * F.log_softmax(mixed / tau, dim=1), dim=1))
    # L657-659: labelled CE with label smoothing on soft targets.
    loss_lab = F.cross_entropy(lab / tau, y, label_smoothing=ls)
    n_mix = 1 if mixed_count == "views" else bs
    T = V * bs + lab_bs + n_mix
    total = (V * bs / T) * loss_unlab + (lab_bs / T) * loss_lab + (n_mix / T) * loss_mixed
    total.backward()
    out[name + ".code0"] = codes[0]
    out[name + ".code1"] = codes[1]
    out[name + ".loss"] = total.reshape(1)
    out[name + ".unlab"] = loss_unlab.reshape(1)
    out[name + ".lab_loss"] = loss_lab.reshape(1)
    out[name + ".mixed_loss"] = loss_mixed.reshape(1)
    out[name + ".d_views"] = output.grad
    out[name + ".d_lab"] = lab.grad
    out[name + ".d_mixed"] = mixed.grad


class DINOLoss(torch.nn.Module):
    # DINO main_dino.py DINOLoss (single rank; the temperature passed in directly).
    def __init__(self, out_dim, ncrops, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output, temp):
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        batch_center = batch_center / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def daino_case(out):
    name = "daino"
    V, bs, K, lab_bs = 5, 4, 13, 6
    temp, ls = 0.0433, 0.01
    student = torch.from_numpy(randn(SEED, name + ".student", [V * bs, K]) * 2).requires_grad_()
    teacher = torch.from_numpy(randn(SEED, name + ".teacher", [2 * bs, K]) * 2)
    center0 = torch.from_numpy(randn(SEED, name + ".center", [1, K]) * 0.5)
    lab = torch.from_numpy(randn(SEED, name + ".lab", [lab_bs, K]) * 2).requires_grad_()
    y = torch.softmax(torch.from_numpy(randn(SEED, name + ".y", [lab_bs, K])) * 3, dim=1)
    crit = DINOLoss(K, V)
    crit.center = center0.clone()
    loss_unlab = crit(student, teacher, temp)
    loss_lab = F.cross_entropy(lab / 0.1, y, label_smoothing=ls)
    T = V * bs + lab_bs
    total = (V * bs / T) * loss_unlab + (lab_bs / T) * loss_lab
    total.backward()
    out[name + ".loss"] = total.reshape(1)
    out[name + ".unlab"] = loss_unlab.reshape(1)
    out[name + ".lab_loss"] = loss_lab.reshape(1)
    out[name + ".d_student"] = student.grad
    out[name + ".d_lab"] = lab.grad
    out[name + ".center"] = crit.center.reshape(-1)


def main():
    torch.manual_seed(0)
    out = {}
    sinkhorn_cases(out)
    suave_case(out, "suave_noq", False, "views")
    suave_case(out, "suave_q", True, "samples")
    daino_case(out)
    save(out, "methods/methods.safetensors")


if __name__ == "__main__":
    main()
