#!/usr/bin/env python3
"""Cut the embedded default dataset `cifar10-mini.zip` from the CIFAR-10 JPEG folders.

Takes, for each of the 10 classes, the first 400 train images and the first 100 test images in
sorted file-name order (deterministic: no randomness, the same source always gives the same
pack), and stores the original JPEG bytes unchanged (no re-encode) as ZIP_STORED entries
`train/<class>/NNNN.jpg` and `test/<class>/NNNN.jpg`. Every entry gets a fixed timestamp and
permission bits and the entries are written in sorted order, so the zip itself is byte-for-byte
reproducible and its md5 (recorded in data/README.md) can be checked.

Usage: python3 data/make_cifar10_mini.py [SOURCE] [OUTPUT]
  SOURCE defaults to ../shared/data/cifar10 (relative to the repository root),
  OUTPUT defaults to data/cifar10-mini.zip.
Standard library only.
"""

import hashlib
import os
import sys
import zipfile

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
# The earliest timestamp the zip format can hold; fixed so that re-running gives the same bytes.
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def entries(source):
    """(archive name, file path) pairs in the order they are written."""
    out = []
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        split_dir = os.path.join(source, split)
        classes = sorted(
            c for c in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, c))
        )
        if len(classes) != 10:
            sys.exit(f"{split_dir}: expected 10 class folders, found {len(classes)}")
        for c in classes:
            class_dir = os.path.join(split_dir, c)
            names = sorted(n for n in os.listdir(class_dir) if n.lower().endswith(".jpg"))
            if len(names) < per_class:
                sys.exit(f"{class_dir}: {len(names)} images, need {per_class}")
            for n in names[:per_class]:
                out.append((f"{split}/{c}/{n}", os.path.join(class_dir, n)))
    return out


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "..", "shared", "data", "cifar10")
    output = sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "data", "cifar10-mini.zip")
    if not os.path.isdir(source):
        sys.exit(f"{source}: CIFAR-10 JPEG folder not found; pass its path as the first argument")
    items = entries(source)
    tmp = output + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for name, path in items:
            with open(path, "rb") as f:
                data = f.read()
            if data[:2] != b"\xff\xd8":
                sys.exit(f"{path}: not a JPEG file")
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            info.create_system = 3  # Unix, so the permission bits above mean what they say
            z.writestr(info, data)
    os.replace(tmp, output)
    with open(output, "rb") as f:
        digest = hashlib.md5(f.read()).hexdigest()
    print(f"{output}: {len(items)} entries, {os.path.getsize(output)} bytes, md5 {digest}")


if __name__ == "__main__":
    main()
