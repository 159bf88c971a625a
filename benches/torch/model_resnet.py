"""PyTorch side of benches/model_resnet.rs: one Suave training forward + backward, torchvision
ResNet-50 + the official Suave heads (projection 2048->2048(BN,ReLU)->128, L2 norm, 1000
prototypes, three online linear heads on detached labelled rows), batch 8 at 224 px, train mode,
f32, channels-last (the engine is NHWC), gradients accumulated into .grad as a training step does.
The case name ends in _bwd so run.py runs it with autograd enabled.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

BATCH, PX, K = 8, 224, 1000
CASES = {}


class SuaveNet(torchvision.models.resnet.ResNet):
    def __init__(self):
        super().__init__(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3])
        del self.fc
        self.projection_head = nn.ModuleList(
            [nn.Sequential(nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True)),
             nn.Linear(2048, 128)]
        )
        self.cls_heads = nn.ModuleList([nn.Linear(2048, K), nn.Linear(2048, K), nn.Linear(128, K)])
        self.prototypes = nn.Linear(128, K, bias=False)

    def forward(self, x, lab_bs):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = torch.flatten(self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(x))))), 1)
        preds = []
        for i, projector in enumerate(self.projection_head):
            preds.append(self.cls_heads[i](x[:lab_bs].detach()))
            x = projector(x)
        preds.append(self.cls_heads[-1](x[:lab_bs].detach()))
        x = F.normalize(x, dim=1, p=2)
        return x, self.prototypes(x), preds


def _suave_step():
    model = SuaveNet().train().to(memory_format=torch.channels_last)
    x = torch.randn(BATCH, 3, PX, PX).contiguous(memory_format=torch.channels_last)
    d_scores = torch.randn(BATCH, K)
    d_online = torch.randn(BATCH, K)

    def step():
        with torch.no_grad():
            model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1, p=2))
        with torch.enable_grad():
            _, scores, preds = model(x, BATCH)
            torch.autograd.backward([scores] + preds, [d_scores] + [d_online] * 3)

    CASES["suave_r50_b8_224_train_bwd"] = step


_suave_step()
