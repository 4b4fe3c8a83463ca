#!/usr/bin/env python3
"""Write chosen shards of the offline CIFAR-10 copy out as an ImageFolder tree.

    python3 scripts/materialize_subset.py OUT_DIR --train data/offline/train-0of2.npz \
        --test data/offline/test.npz [--per-class N]

``../shared/data/cifar10/materialize.py`` always reads both train shards from its own
folder; this helper takes any shard files (e.g. one train shard carried to a GPU machine)
and writes ``OUT_DIR/train/<class>/<name>.jpg`` and ``OUT_DIR/test/<class>/<name>.jpg``,
the layout ``stars`` reads with ``data.format: imagefolder`` (or ``auto``).

Each ``.npz`` holds ``buf`` (uint8, JPEG files end to end), ``offsets`` (int64, n+1),
``y`` (uint8 labels), ``files`` (original relative paths) and ``class_names``
(``shared/data/cifar10/README.md``). Needs only numpy. Files already present with the right
size are skipped, so re-running is cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def write_split(out: Path, split: str, shards: list[Path], per_class: int | None) -> int:
    """Write the images of ``shards`` to ``out/split/<class>/``; returns how many."""
    kept: dict[int, int] = {}
    count = 0
    names: list[str] | None = None
    for shard in shards:
        with np.load(shard, allow_pickle=False) as d:
            buf, offsets, labels, files = d["buf"], d["offsets"], d["y"], d["files"]
            shard_names = [str(c) for c in d["class_names"]]
        if names is None:
            names = shard_names
        elif names != shard_names:
            raise SystemExit(f"{shard}: class_names differ from the first shard's")
        if len(offsets) != len(files) + 1 or len(labels) != len(files):
            raise SystemExit(f"{shard}: offsets/y/files lengths do not match")
        for i, rel in enumerate(files):
            label = int(labels[i])
            if per_class is not None and kept.get(label, 0) >= per_class:
                continue
            kept[label] = kept.get(label, 0) + 1
            target = out / split / shard_names[label] / Path(str(rel)).name
            data = buf[offsets[i] : offsets[i + 1]].tobytes()
            if not (target.exists() and target.stat().st_size == len(data)):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            count += 1
    # every class gets a folder, so train/ and test/ always list the same classes
    for name in names or []:
        (out / split / name).mkdir(parents=True, exist_ok=True)
    return count


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write train/ and test/ into")
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="train shard(s), .npz")
    parser.add_argument("--test", type=Path, nargs="+", required=True, help="test shard(s), .npz")
    parser.add_argument(
        "--per-class", type=int, default=None, help="images kept per class and split"
    )
    args = parser.parse_args(argv)
    if args.per_class is not None and args.per_class < 1:
        parser.error("--per-class must be at least 1")
    for shard in [*args.train, *args.test]:
        if not shard.is_file():
            parser.error(f"shard not found: {shard}")
    written = {
        "train": write_split(args.out, "train", args.train, args.per_class),
        "test": write_split(args.out, "test", args.test, args.per_class),
    }
    print(
        f"CIFAR-10 (JPEG q75) ImageFolder at {args.out}: "
        + ", ".join(f"{k} {v}" for k, v in written.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
