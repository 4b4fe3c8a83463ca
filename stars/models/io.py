"""Model weights on disk: safetensors plus a JSON metadata sidecar. Nothing is ever unpickled.

``save_model(model, path, meta)`` writes ``path`` (``*.safetensors``, the metadata is also put
in the safetensors header) and ``path.with_suffix(".json")``. ``load_model_weights`` checks the
architecture and class count recorded there against what the caller expects before loading.
Writes are atomic: a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from stars.errors import StarsError
from stars.models.protocols import Network

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "convert_pickle_checkpoint",
    "load_model_weights",
    "read_metadata",
    "save_model",
]

PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar"}


class CheckpointError(StarsError):
    """A weights file is missing, unsafe, corrupted or does not fit the model."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _state_tensors(model: Network) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model(model: Network, path: Path, meta: Mapping[str, Any]) -> None:
    """Save ``model``'s state dict as safetensors at ``path`` and ``meta`` beside it as JSON."""
    from safetensors.torch import save

    header = {k: json.dumps(v) for k, v in meta.items()}
    atomic_write_bytes(path, save(_state_tensors(model), metadata=header))
    atomic_write_bytes(
        path.with_suffix(".json"), (json.dumps(dict(meta), indent=2) + "\n").encode()
    )


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing a pickle-based checkpoint ({path.suffix}); loading it could run "
            "arbitrary code. If you trust it, convert it once with "
            "`stars convert-checkpoint FILE OUT.safetensors`, which reads it with "
            "torch.load(weights_only=True) and writes safetensors."
        )


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a weights file: the JSON sidecar, else the safetensors header."""
    _refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{sidecar}: metadata is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{sidecar}: metadata must be a JSON object")
        return data
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupted, not a readable safetensors file ({exc})"
        ) from None
    return {k: _header_value(v) for k, v in header.items()}


def _header_value(text: str) -> Any:
    """A safetensors header value: JSON when ``save_model`` wrote it, else the plain string
    (files from other tools carry entries such as ``{"format": "pt"}``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_model_weights(
    model: nn.Module,
    path: Path,
    *,
    expect: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load safetensors weights into ``model`` after checking metadata against ``expect``.

    Args:
        model: the freshly built model to fill.
        path: a ``.safetensors`` file (a pickle file is refused).
        expect: metadata fields that must match, e.g. ``{"arch": "resnet20", "num_classes": 10}``.

    Returns:
        The file's metadata.
    """
    meta = read_metadata(path)
    for key, want in (expect or {}).items():
        have = meta.get(key)
        if have is not None and have != want:
            raise CheckpointError(
                f"{path}: checkpoint has {key}={have!r} but the config asks for {want!r}"
            )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupted safetensors file ({exc})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    bad_shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(tensors))
        if tensors[k].shape != own[k].shape
    ]
    if missing or unexpected or bad_shapes:
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                f"shape mismatch {bad_shapes[:3]}" if bad_shapes else "",
            )
            if part
        )
        raise CheckpointError(f"{path}: weights do not fit the model ({detail})")
    model.load_state_dict(tensors)
    return meta


def convert_pickle_checkpoint(
    src: Path,
    dst: Path,
    *,
    meta: Mapping[str, Any],
    model: nn.Module | None = None,
    rename: Callable[[dict[str, torch.Tensor], Mapping[str, Any]], dict[str, torch.Tensor]]
    | None = None,
) -> int:
    """Convert a PyTorch pickle checkpoint to safetensors, loading it as safely as torch can.

    The file is read with ``torch.load(weights_only=True)``, which only rebuilds tensors and
    plain containers and refuses any other object (so a payload is rejected, not run). A
    state dict is taken from the top level or from a ``state_dict`` / ``model`` / ``net``
    entry; a ``module.`` prefix (DataParallel) is stripped. ``rename(tensors, top_level)``,
    when given, maps the keys of another repository's layout to the model's (``top_level``
    is the file's top-level mapping, e.g. its ``arch`` entry; :mod:`stars.models.convert`).
    When ``model`` is given the weights must fit it. Returns the number of tensors written.
    """
    if not src.is_file():
        raise CheckpointError(f"file not found: {src}")
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"the output must end in .safetensors, got {dst}")
    import pickle

    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{src}: refused by torch.load(weights_only=True), nothing in it was executed: {first}"
        ) from None
    state: Any = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "net"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{src}: no state dict (a mapping of names to tensors) found")
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{src}: entry {k!r} is a {type(v).__name__}, not a tensor")
        tensors[str(k).removeprefix("module.")] = v.detach().cpu().contiguous()
    if rename is not None:
        tensors = rename(tensors, obj if isinstance(obj, dict) else {})
    if model is not None:
        own = model.state_dict()
        bad = sorted(set(own) ^ set(tensors))[:5]
        shapes = [k for k in own if k in tensors and own[k].shape != tensors[k].shape][:5]
        if bad or shapes:
            raise CheckpointError(
                f"{src}: weights do not fit {meta.get('arch')} "
                f"(key differences {bad}, shape differences {shapes})"
            )
    from safetensors.torch import save

    header = {k: json.dumps(v) for k, v in meta.items()}
    atomic_write_bytes(dst, save(tensors, metadata=header))
    atomic_write_bytes(dst.with_suffix(".json"), (json.dumps(dict(meta), indent=2) + "\n").encode())
    return len(tensors)
