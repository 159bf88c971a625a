"""PyTorch side of benches/model_vit.rs: timm's vit_small_patch16_224 (num_classes=0, drop path
0.1, train mode) + DINO's head (use_bn=False, 1000 prototypes, weight_g trainable), batch 8 at
224 px, f32, one forward + backward from a fixed upstream gradient of the logits, gradients
reset each step (zero_grad(set_to_none=True), PyTorch's default). At 224 px timm's forward is
DINO's (no position-embedding resize). The case name ends in _bwd so that run.py enables grad.
"""
import warnings

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore", category=FutureWarning)
torch.manual_seed(0)


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


def make():
    backbone = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, drop_path_rate=0.1)
    model = nn.Sequential(backbone, DINOHead(384, 1000)).train()
    x = torch.randn(8, 3, 224, 224)
    dl = torch.randn(8, 1000)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits.backward(dl)

    return step


CASES = {"vits16_daino_b8_224_fwd_bwd": make()}
