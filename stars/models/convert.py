"""Teacher checkpoints of the data-free KD repositories, mapped into stars' architectures.

CMI (zju-vipa/CMI), Fast-Datafree (zju-vipa/Fast-Datafree), NAYER and SpaceshipNet all
start from one shared set of CIFAR teacher checkpoints, ``torch.save({"arch": ..., "state_dict":
...})`` pickles of the classifiers in CMI's ``datafree/models/classifiers`` (the same code in
each repository). Their networks are stars' teachers layer for layer (checked shape by shape
in ``tests/models/test_convert.py``); only the key names differ, except VGG, for which stars
has the matching variant :class:`~stars.models.teachers.BlockVGG` (``vgg*_cmi``):

=============================  ==============================  ================================
their model (``--arch``)       their keys                      stars arch and keys
=============================  ==============================  ================================
resnet18, resnet34             ``layer{1..4}.{j}.*``,          same name; ``layers.{k}.*``,
                               ``.shortcut.*``, ``linear.*``    ``.shortcut.*``, ``fc.*``
resnet20, resnet32, resnet56   ``layer{1..3}.{j}.*``,          same name; ``layers.{k}.*``,
                               ``.downsample.*``, ``fc.*``      ``.shortcut.*``, ``fc.*``
wrn16_1, wrn16_2, wrn40_1,     ``block{1..3}.layer.{j}.*``,    same name; ``blocks.{k}.*``,
wrn40_2                        ``.convShortcut.*``, ``bn1.*``   ``.shortcut.*``, ``bn.*``
vgg8, vgg11, vgg13 (with BN)   ``block{0..4}.{i}.*``,          ``vgg*_cmi``; ``body.{p}.*``,
                               ``classifier.*``                 ``fc.*``
=============================  ==============================  ================================

``k`` numbers the residual blocks across stages in order; ``p`` is the position of the i-th
convolution or BatchNorm in ``BlockVGG.body``. Keys outside these patterns (``conv1``, the stem
``bn1`` of a ResNet) are the same in both. The file is read with ``torch.load(weights_only=True)``
(:func:`stars.models.io.convert_pickle_checkpoint`); every key and shape must then fit the stars
model exactly, or the conversion stops naming the keys and shapes that differ and writes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from stars.models.io import CheckpointError, convert_pickle_checkpoint
from stars.models.teachers import build_teacher_arch

__all__ = [
    "CMI_ARCHS",
    "LAYOUT_ALIASES",
    "ConvertResult",
    "Layout",
    "convert_checkpoint",
    "map_cmi_state",
]

Layout = Literal["stars", "cmi"]
"""``stars``: the file already has stars' key names; ``cmi``: the DFKD repositories' layout."""

LAYOUT_ALIASES: dict[str, Layout] = {
    "stars": "stars",
    "cmi": "cmi",
    "fast-datafree": "cmi",
    "nayer": "cmi",
    "spaceshipnet": "cmi",
}
"""Every ``--from`` name: the repositories that share CMI's teachers share its layout."""

CMI_ARCHS: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet20": "resnet20",
    "resnet32": "resnet32",
    "resnet56": "resnet56",
    "wrn16_1": "wrn16_1",
    "wrn16_2": "wrn16_2",
    "wrn40_1": "wrn40_1",
    "wrn40_2": "wrn40_2",
    "vgg8": "vgg8_cmi",
    "vgg11": "vgg11_cmi",
    "vgg13": "vgg13_cmi",
}
"""Their model name (as in their ``registry.py``) -> the stars teacher arch it loads into."""

_Family = Literal["resnet", "cifar_resnet", "wrn", "vgg"]
_FAMILY: dict[str, _Family] = {
    "resnet18": "resnet",
    "resnet34": "resnet",
    "resnet20": "cifar_resnet",
    "resnet32": "cifar_resnet",
    "resnet56": "cifar_resnet",
    "wrn16_1": "wrn",
    "wrn16_2": "wrn",
    "wrn40_1": "wrn",
    "wrn40_2": "wrn",
    "vgg8": "vgg",
    "vgg11": "vgg",
    "vgg13": "vgg",
}

_RESNET_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")
_WRN_BLOCK = re.compile(r"^block(\d+)\.layer\.(\d+)\.(.+)$")
_VGG_LAYER = re.compile(r"^block(\d+)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_checkpoint` wrote."""

    tensors: int
    arch: str
    """The stars teacher arch (``teacher.arch`` in a config)."""


def _ranks(keys: list[str], pattern: re.Pattern[str]) -> dict[tuple[int, int], int]:
    """``(stage, index) -> k``: the blocks (or layers) in numeric order, numbered from 0."""
    pairs = {(int(m[1]), int(m[2])) for k in keys if (m := pattern.match(k))}
    return {pair: k for k, pair in enumerate(sorted(pairs))}


def _renamer(family: _Family, keys: list[str], model: nn.Module) -> Callable[[str], str]:
    """The key map of one checkpoint (block numbering taken from its own keys)."""
    match family:
        case "resnet" | "cifar_resnet":
            ranks = _ranks(keys, _RESNET_BLOCK)

            def resnet(key: str) -> str:
                if m := _RESNET_BLOCK.match(key):
                    rest = m[3]
                    if family == "cifar_resnet":
                        rest = re.sub(r"^downsample\.", "shortcut.", rest)
                    return f"layers.{ranks[(int(m[1]), int(m[2]))]}.{rest}"
                return re.sub(r"^linear\.", "fc.", key)

            return resnet
        case "wrn":
            ranks = _ranks(keys, _WRN_BLOCK)

            def wrn(key: str) -> str:
                if m := _WRN_BLOCK.match(key):
                    rest = re.sub(r"^convShortcut\.", "shortcut.", m[3])
                    return f"blocks.{ranks[(int(m[1]), int(m[2]))]}.{rest}"
                return re.sub(r"^bn1\.", "bn.", key)

            return wrn
        case "vgg":
            ranks = _ranks(keys, _VGG_LAYER)
            body = model.get_submodule("body")
            slots = [  # positions of the convolutions and BatchNorms
                i for i, m in enumerate(body.children()) if m.state_dict()
            ]

            def vgg(key: str) -> str:
                if m := _VGG_LAYER.match(key):
                    rank = ranks[(int(m[1]), int(m[2]))]
                    slot = slots[rank] if rank < len(slots) else f"<extra layer {rank}>"
                    return f"body.{slot}.{m[3]}"
                return re.sub(r"^classifier\.", "fc.", key)

            return vgg


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def map_cmi_state(
    tensors: Mapping[str, Tensor], *, arch: str, model: nn.Module, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """Rename a CMI-layout state dict to ``model``'s keys and check that it fits exactly.

    Args:
        tensors: the checkpoint's state dict (their key names).
        arch: their model name, a key of :data:`CMI_ARCHS`.
        model: the stars teacher it must fit (``build_teacher_arch(CMI_ARCHS[arch], ...)``).
        source: how to name the file in messages.

    Returns:
        The same tensors under stars' key names.

    Raises:
        CheckpointError: naming the keys missing on either side and the shapes that differ
            (each as ``their key -> stars key``).
    """
    try:
        family = _FAMILY[arch]
    except KeyError:
        raise CheckpointError(
            f"--arch {arch!r} is not a CMI-layout model; allowed: {sorted(CMI_ARCHS)}"
        ) from None
    rename = _renamer(family, list(tensors), model)
    mapped: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in tensors.items():
        new = rename(key)
        if new in mapped:
            raise CheckpointError(f"{source}: {origin[new]!r} and {key!r} both map to {new!r}")
        mapped[new], origin[new] = value, key
    own = model.state_dict()
    stars_arch = CMI_ARCHS[arch]
    missing = [k for k in own if k not in mapped]
    unexpected = [f"{origin[k]} -> {k}" for k in mapped if k not in own]
    shapes = [
        f"{origin[k]} -> {k}: file {_shape(mapped[k])} vs {stars_arch} {_shape(own[k])}"
        for k in own
        if k in mapped and mapped[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(missing)} {stars_arch} keys not in the file, e.g. {missing[:4]}"
            if missing
            else "",
            f"{len(unexpected)} file keys with no place in {stars_arch}, e.g. {unexpected[:4]}"
            if unexpected
            else "",
            f"{len(shapes)} shapes differ, e.g. {shapes[:3]}" if shapes else "",
        ]
        raise CheckpointError(
            f"{source}: the weights do not fit their {arch} as stars' {stars_arch} ("
            + "; ".join(p for p in parts if p)
            + "). Check --arch and --num-classes."
        )
    return mapped


def convert_checkpoint(
    src: Path,
    dst: Path,
    *,
    arch: str,
    num_classes: int,
    image_size: int = 32,
    layout: str = "stars",
) -> ConvertResult:
    """Convert a pickle checkpoint (read with ``weights_only=True``) to a stars teacher file.

    Args:
        src: the ``.pt`` / ``.pth`` file (trusted or not: nothing in it is executed).
        dst: the ``.safetensors`` file to write (with its ``.json`` metadata).
        arch: the stars teacher arch for ``layout="stars"``; for ``cmi`` their model name
            (``resnet34``, ``wrn40_2``, ``vgg11``...) or the stars arch it maps to.
        num_classes: classes of the head.
        image_size: input size (the CMI layout is converted for 32x32 CIFAR inputs only).
        layout: a key of :data:`LAYOUT_ALIASES`.

    Returns:
        How many tensors were written, and the stars arch recorded in the metadata.

    Raises:
        CheckpointError: for an unknown layout or arch, or weights that do not fit.
    """
    try:
        kind = LAYOUT_ALIASES[layout]
    except KeyError:
        raise CheckpointError(
            f"--from {layout!r} is not a known layout; allowed: {sorted(LAYOUT_ALIASES)}"
        ) from None
    rename: Callable[[dict[str, Tensor], Mapping[str, Any]], dict[str, Tensor]] | None = None
    theirs = arch
    if kind == "cmi":
        by_stars = {v: k for k, v in CMI_ARCHS.items()}
        theirs = by_stars.get(arch, arch)
        if theirs not in CMI_ARCHS:
            raise CheckpointError(
                f"--arch {arch!r} is not one of the CMI-layout models; allowed: {sorted(CMI_ARCHS)}"
            )
        if image_size != 32:
            raise CheckpointError(
                f"--image-size {image_size}: CMI-layout teachers are converted for 32x32 "
                "(CIFAR) inputs; their stems keep stride 1 where stars' 64-px stems have stride 2"
            )
        arch = CMI_ARCHS[theirs]
    try:
        model = build_teacher_arch(arch, num_classes=num_classes, image_size=image_size)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if kind == "cmi":

        def rename_cmi(tensors: dict[str, Tensor], top: Mapping[str, Any]) -> dict[str, Tensor]:
            recorded = top.get("arch")
            if isinstance(recorded, str) and recorded != theirs:
                raise CheckpointError(
                    f"{src}: the file records arch {recorded!r}, but --arch is {theirs!r}"
                )
            return map_cmi_state(tensors, arch=theirs, model=model, source=str(src))

        rename = rename_cmi
    meta: dict[str, Any] = {
        "kind": "teacher",
        "arch": arch,
        "num_classes": num_classes,
        "image_size": image_size,
        "converted_from": str(src),
    }
    if kind != "stars":
        meta["source_layout"] = f"{layout} ({theirs})"
    n = convert_pickle_checkpoint(src, dst, meta=meta, model=model, rename=rename)
    return ConvertResult(n, arch)
