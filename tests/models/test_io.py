"""safetensors weights + JSON metadata: round trips, mismatches, corruption, no unpickling."""

from __future__ import annotations

import json
import pathlib
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stars.config import TeacherConfig
from stars.errors import StarsError
from stars.models.factory import build_teacher, bundled_teacher_path
from stars.models.io import CheckpointError, load_model_weights, read_metadata, save_model
from stars.models.teachers import ANNTeacher, build_teacher_arch

META: dict[str, Any] = {
    "kind": "teacher",
    "arch": "resnet20",
    "num_classes": 10,
    "image_size": 32,
    "mean": [0.5, 0.5, 0.5],
    "test_top1": 12.5,
}


def _model(arch: str = "resnet20", num_classes: int = 10, seed: int = 0) -> ANNTeacher:
    torch.manual_seed(seed)
    model = build_teacher_arch(arch, num_classes=num_classes)
    # make the BN buffers non-trivial so the round trip covers them
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    return model


@pytest.fixture
def saved(tmp_path: Path) -> tuple[ANNTeacher, Path]:
    model = _model()
    path = tmp_path / "w" / "teacher.safetensors"
    save_model(model, path, META)
    return model, path


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_restores_the_exact_state(saved: tuple[ANNTeacher, Path]) -> None:
    model, path = saved
    fresh = _model(seed=1)
    assert not torch.equal(fresh.fc.weight, model.fc.weight)
    meta = load_model_weights(fresh, path, expect={"arch": "resnet20", "num_classes": 10})
    _assert_same_state(fresh, model)
    assert meta == META
    # no temporary files are left behind by the atomic writes
    assert sorted(p.name for p in path.parent.iterdir()) == ["teacher.json", "teacher.safetensors"]


def test_round_trip_of_a_channels_last_model(tmp_path: Path) -> None:
    model = _model().to(memory_format=torch.channels_last)
    path = tmp_path / "cl.safetensors"
    save_model(model, path, META)
    fresh = _model(seed=1)
    load_model_weights(fresh, path)
    _assert_same_state(fresh, model)


def test_metadata_is_in_the_sidecar_and_the_header(saved: tuple[ANNTeacher, Path]) -> None:
    _, path = saved
    sidecar = path.with_suffix(".json")
    assert json.loads(sidecar.read_text()) == META
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata()
    assert {k: json.loads(v) for k, v in header.items()} == META
    assert read_metadata(path) == META
    # without the sidecar the header alone still answers
    sidecar.unlink()
    assert read_metadata(path) == META
    fresh = _model(seed=1)
    assert load_model_weights(fresh, path, expect={"arch": "resnet20"}) == META


def test_third_party_safetensors_header_that_is_not_json(tmp_path: Path) -> None:
    """Files written by other tools carry plain-string metadata (e.g. {"format": "pt"})."""
    model = _model()
    path = tmp_path / "hf.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "arch": '"resnet20"'})
    meta = read_metadata(path)
    assert meta["format"] == "pt"
    assert meta["arch"] == "resnet20"
    fresh = _model(seed=1)
    load_model_weights(fresh, path, expect={"arch": "resnet20", "num_classes": 10})
    _assert_same_state(fresh, model)


@pytest.mark.parametrize(
    ("key", "have", "want"), [("arch", "resnet20", "resnet32"), ("num_classes", 10, 100)]
)
def test_metadata_mismatch_names_both_values(
    saved: tuple[ANNTeacher, Path], key: str, have: object, want: object
) -> None:
    _, path = saved
    fresh = _model(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_model_weights(fresh, path, expect={"arch": "resnet20", "num_classes": 10, key: want})
    msg = str(info.value)
    assert key in msg
    assert repr(have) in msg
    assert repr(want) in msg
    # nothing was loaded
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_shape_mismatch_without_metadata_is_a_checkpoint_error(
    saved: tuple[ANNTeacher, Path],
) -> None:
    _, path = saved
    path.with_suffix(".json").unlink()
    other = build_teacher_arch("resnet20", num_classes=100)
    with pytest.raises(CheckpointError, match=r"fc\.weight"):
        load_model_weights(other, path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_metadata(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.99])
@pytest.mark.parametrize("sidecar", [True, False])
def test_truncated_file(saved: tuple[ANNTeacher, Path], keep: float, sidecar: bool) -> None:
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    if not sidecar:
        path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match=r"truncated|corrupted") as info:
        load_model_weights(_model(seed=1), path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [b"", b"garbage, not a safetensors file at all" * 10, struct.pack("<Q", 2**40) + b"{}"],
    ids=["empty", "text", "huge-header-length"],
)
def test_garbage_file(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"truncated|corrupted"):
        read_metadata(path)
    with pytest.raises(CheckpointError, match=r"truncated|corrupted"):
        load_model_weights(_model(), path)


class _Payload:
    """Unpickling this object creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin", ".safetensors"])
def test_pickle_files_are_refused_without_running_them(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    # sanity: the payload works when unpickled (in a different folder)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    with pytest.raises(CheckpointError) as info:
        read_metadata(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model_weights(_model(), path)
    assert not marker.exists()
    cfg = TeacherConfig(arch="resnet20", checkpoint=path)
    with pytest.raises(StarsError):
        build_teacher(cfg, num_classes=10)
    assert not marker.exists()
    if suffix != ".safetensors":
        assert "pickle" in str(info.value)


def test_build_teacher_without_checkpoint_needs_the_bundled_arch() -> None:
    with pytest.raises(StarsError, match=r"teacher\.checkpoint") as info:
        build_teacher(TeacherConfig(arch="resnet32"), num_classes=10)
    assert "resnet32" in str(info.value)
    with pytest.raises(StarsError, match=r"teacher\.checkpoint"):
        build_teacher(TeacherConfig(arch="resnet20"), num_classes=100, dataset="cifar100")


def test_build_teacher_loads_and_freezes_an_explicit_checkpoint(tmp_path: Path) -> None:
    src = _model("resnet32")
    path = tmp_path / "r32.safetensors"
    save_model(src, path, {"arch": "resnet32", "num_classes": 10, "image_size": 32})
    teacher = build_teacher(TeacherConfig(arch="resnet32", checkpoint=path), num_classes=10)
    _assert_same_state(teacher, src)
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())

    with pytest.raises(CheckpointError, match="num_classes"):
        build_teacher(TeacherConfig(arch="resnet32", checkpoint=path), num_classes=100)
    with pytest.raises(CheckpointError, match="arch"):
        build_teacher(TeacherConfig(arch="resnet56", checkpoint=path), num_classes=10)


def test_build_teacher_load_weights_false_gives_a_trainable_model() -> None:
    teacher = build_teacher(TeacherConfig(arch="vgg11"), num_classes=10, load_weights=False)
    assert all(p.requires_grad for p in teacher.parameters())


def test_bundled_teacher_loads() -> None:
    path = bundled_teacher_path()
    if not path.is_file():
        pytest.skip(f"bundled teacher not trained yet ({path} is absent)")
    teacher = build_teacher(TeacherConfig(), num_classes=10)
    assert all(not p.requires_grad for p in teacher.parameters())
    meta = read_metadata(path)
    assert meta["arch"] == "resnet20"
    assert meta["num_classes"] == 10
    with torch.no_grad():
        out = teacher(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_saved_files_get_the_usual_mode(tmp_path: Path) -> None:
    import os

    from stars.models.io import save_model as save
    from stars.models.teachers import build_teacher_arch as arch

    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "m.safetensors"
    save(arch("resnet20", num_classes=10), path, {"arch": "resnet20"})
    for p in (path, path.with_suffix(".json")):
        assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)
