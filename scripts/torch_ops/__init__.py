"""PyTorch counterparts of the engine's own kernels, one module per kernels/<family>.cu.

Each module defines KINDS: {kind: build(torch, F, spec, rnd) -> zero-argument callable or None},
where `spec` is the `torch` field of an engine check row (written by the family's
`check_rows` in src/backend/device/<family>.rs) and rnd(shape, dtype) gives fresh uniform
values in [-1, 1) on the check's device. scripts/device_check.py merges every module's KINDS.
"""

import importlib
import pkgutil


def all_kinds():
    kinds = {}
    for m in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{m.name}")
        for k, fn in getattr(mod, "KINDS", {}).items():
            if k in kinds:
                raise ValueError(f"torch_ops: kind {k!r} defined twice ({m.name})")
            kinds[k] = fn
    return kinds
