"""Resumable checkpoints without pickle: nested state as one safetensors file.

A training state (student, generator, optimizers, schedulers, memory bank, RNG states, epoch)
is a tree of dicts, lists, tuples, numbers, strings and tensors. :func:`save_state` splits it
into the tensors (stored as safetensors) and a JSON skeleton (stored in the safetensors
header), written atomically (temp file + fsync + rename), so a process killed at any moment
leaves the previous checkpoint readable. :func:`load_state` rebuilds the tree; nothing is
ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from stars.models.io import CheckpointError, atomic_write_bytes

__all__ = ["flatten_state", "load_state", "save_state", "unflatten_state"]

_TREE_KEY = "stars.tree"


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into ``(tensors by name, JSON-able skeleton)``."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": name}
        if isinstance(x, dict):
            items = []
            for k, v in x.items():
                if not isinstance(k, str | int):
                    raise TypeError(f"checkpoint dict keys must be str or int, got {type(k)}")
                items.append([k, walk(v)])
            return {"__dict__": items}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).removeprefix("torch.")}
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"cannot checkpoint a value of type {type(x).__name__}")

    return tensors, walk(obj)


def unflatten_state(tensors: dict[str, torch.Tensor], tree: Any) -> Any:
    """Inverse of :func:`flatten_state`."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__dict__" in x:
                return {k: walk(v) for k, v in x["__dict__"]}
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            if "__dtype__" in x:
                return getattr(torch, x["__dtype__"])
            raise CheckpointError(f"unknown node in checkpoint skeleton: {sorted(x)}")
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(tree)


def save_state(path: Path, state: Any) -> None:
    """Write ``state`` to ``path`` atomically (safetensors with a JSON skeleton)."""
    tensors, tree = flatten_state(state)
    data = save(tensors, metadata={_TREE_KEY: json.dumps(tree)})
    atomic_write_bytes(path, data)


def load_state(path: Path) -> Any:
    """Read a state written by :func:`save_state`."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    raw = path.read_bytes()
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
        tree = json.loads(header["__metadata__"][_TREE_KEY])
    except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable or corrupted checkpoint ({exc})") from None
    return unflatten_state(tensors, tree)
