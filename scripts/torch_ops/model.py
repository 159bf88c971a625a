"""PyTorch side of the model rows (src/models/device/resnet.rs `check_rows`): one training pass
of the backbone, forward and backward from a gradient of the pooled features, as the official
Suave code runs it on a GPU: torchvision's ResNet-50 (fc removed), train mode, channels-last,
bf16 autocast (the official scripts use apex/AMP mixed precision), parameter gradients
accumulated in fp32. The image gradient is not computed, as in the engine.
"""


def resnet_train(torch, F, spec, rnd):
    try:
        import torchvision
    except Exception:  # noqa: BLE001 - torchvision absent: no PyTorch number for this row
        return None
    n, hw = int(spec["n"]), int(spec["hw"])
    dev = rnd((1,), torch.float32).device
    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
    model = model.to(dev).to(memory_format=torch.channels_last).train()
    x = rnd((n, 3, hw, hw), torch.float32).contiguous(memory_format=torch.channels_last)
    dy = rnd((n, 2048), torch.float32)
    cuda = dev.type == "cuda"

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
            f = model(x)
        f.float().backward(dy)

    return step


KINDS = {"resnet_train": resnet_train}
