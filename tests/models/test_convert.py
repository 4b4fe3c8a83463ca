"""Community teacher checkpoints (CMI / Fast-Datafree / NAYER / SpaceshipNet) into stars.

The state dicts here are built from *their* key names and shapes, written down from the
classifiers in zju-vipa/CMI ``datafree/models/classifiers`` (resnet.py, resnet_tiny.py,
wresnet.py, vgg.py), independently of stars' mapping code: if the mapping or a stars
architecture drifted from theirs, a key or a shape would not fit. Their forward passes give
the feature-map size each convolution sees; stars' networks must see the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch import Tensor, nn
from typer.testing import CliRunner

from stars.cli import app
from stars.config import TeacherConfig
from stars.models.convert import CMI_ARCHS, LAYOUT_ALIASES, convert_checkpoint, map_cmi_state
from stars.models.factory import build_teacher
from stars.models.io import CheckpointError
from stars.models.teachers import build_teacher_arch

State = dict[str, Tensor]


def _bn(state: State, prefix: str, c: int) -> None:
    state[f"{prefix}.weight"] = torch.rand(c)
    state[f"{prefix}.bias"] = torch.randn(c)
    state[f"{prefix}.running_mean"] = torch.randn(c)
    state[f"{prefix}.running_var"] = torch.rand(c) + 0.5
    state[f"{prefix}.num_batches_tracked"] = torch.tensor(7)


def _conv(state: State, key: str, cout: int, cin: int, k: int) -> None:
    state[key] = torch.randn(cout, cin, k, k)


def cmi_resnet(blocks: tuple[int, ...], k: int) -> State:
    """resnet.py: 3x3 stem 64, ``layer1..4`` of BasicBlocks 64-128-256-512 (stride 2 from
    layer2), ``shortcut.0/.1`` conv1x1 + BN when the shape changes, ``linear``."""
    s: State = {}
    _conv(s, "conv1.weight", 64, 3, 3)
    _bn(s, "bn1", 64)
    cin = 64
    for layer, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), 1):
        for j in range(n):
            stride = 2 if layer > 1 and j == 0 else 1
            p = f"layer{layer}.{j}"
            _conv(s, f"{p}.conv1.weight", planes, cin, 3)
            _bn(s, f"{p}.bn1", planes)
            _conv(s, f"{p}.conv2.weight", planes, planes, 3)
            _bn(s, f"{p}.bn2", planes)
            if stride != 1 or cin != planes:
                _conv(s, f"{p}.shortcut.0.weight", planes, cin, 1)
                _bn(s, f"{p}.shortcut.1", planes)
            cin = planes
    s["linear.weight"], s["linear.bias"] = torch.randn(k, 512), torch.randn(k)
    return s


def cmi_cifar_resnet(depth: int, k: int) -> State:
    """resnet_tiny.py: stem 16, ``layer1..3`` of (depth - 2) / 6 blocks 16-32-64,
    ``downsample.0/.1`` when the shape changes, ``fc``."""
    n = (depth - 2) // 6
    s: State = {}
    _conv(s, "conv1.weight", 16, 3, 3)
    _bn(s, "bn1", 16)
    cin = 16
    for layer, planes in enumerate((16, 32, 64), 1):
        for j in range(n):
            stride = 2 if layer > 1 and j == 0 else 1
            p = f"layer{layer}.{j}"
            _conv(s, f"{p}.conv1.weight", planes, cin, 3)
            _bn(s, f"{p}.bn1", planes)
            _conv(s, f"{p}.conv2.weight", planes, planes, 3)
            _bn(s, f"{p}.bn2", planes)
            if stride != 1 or cin != planes:
                _conv(s, f"{p}.downsample.0.weight", planes, cin, 1)
                _bn(s, f"{p}.downsample.1", planes)
            cin = planes
    s["fc.weight"], s["fc.bias"] = torch.randn(k, 64), torch.randn(k)
    return s


def cmi_wrn(depth: int, widen: int, k: int) -> State:
    """wresnet.py: stem 16, ``block1..3.layer.j`` pre-activation blocks (bn1 on the input,
    ``convShortcut`` when in != out), a final ``bn1``, ``fc``."""
    n = (depth - 4) // 6
    s: State = {}
    _conv(s, "conv1.weight", 16, 3, 3)
    cin = 16
    for b, width in enumerate((16 * widen, 32 * widen, 64 * widen), 1):
        for j in range(n):
            p = f"block{b}.layer.{j}"
            _bn(s, f"{p}.bn1", cin)
            _conv(s, f"{p}.conv1.weight", width, cin, 3)
            _bn(s, f"{p}.bn2", width)
            _conv(s, f"{p}.conv2.weight", width, width, 3)
            if cin != width:
                _conv(s, f"{p}.convShortcut.weight", width, cin, 1)
            cin = width
    _bn(s, "bn1", cin)
    s["fc.weight"], s["fc.bias"] = torch.randn(k, cin), torch.randn(k)
    return s


CMI_VGG_BLOCKS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def cmi_vgg(name: str, k: int) -> State:
    """vgg.py (``*_bn``): ``block0..4`` Sequentials of conv (with bias), BN, ReLU (the last
    ReLU dropped), so conv m of a block is at 3m and its BN at 3m + 1; ``classifier``."""
    s: State = {}
    cin = 3
    for b, widths in enumerate(CMI_VGG_BLOCKS[name]):
        for m, w in enumerate(widths):
            _conv(s, f"block{b}.{3 * m}.weight", w, cin, 3)
            s[f"block{b}.{3 * m}.bias"] = torch.randn(w)
            _bn(s, f"block{b}.{3 * m + 1}", w)
            cin = w
    s["classifier.weight"], s["classifier.bias"] = torch.randn(k, 512), torch.randn(k)
    return s


THEIRS: dict[str, Callable[[int], State]] = {
    "resnet18": lambda k: cmi_resnet((2, 2, 2, 2), k),
    "resnet34": lambda k: cmi_resnet((3, 4, 6, 3), k),
    "resnet20": lambda k: cmi_cifar_resnet(20, k),
    "resnet32": lambda k: cmi_cifar_resnet(32, k),
    "resnet56": lambda k: cmi_cifar_resnet(56, k),
    "wrn16_1": lambda k: cmi_wrn(16, 1, k),
    "wrn16_2": lambda k: cmi_wrn(16, 2, k),
    "wrn40_1": lambda k: cmi_wrn(40, 1, k),
    "wrn40_2": lambda k: cmi_wrn(40, 2, k),
    "vgg8": lambda k: cmi_vgg("vgg8", k),
    "vgg11": lambda k: cmi_vgg("vgg11", k),
    "vgg13": lambda k: cmi_vgg("vgg13", k),
}

# Spatial size of the input of each 3x3 convolution in their forward pass at 32x32 (1x1
# shortcuts left out): ResNets halve at each stage after the first; their VGG max-pools after
# block0..2 only (pool3 runs for 64x64 inputs), so blocks 3 and 4 both run at 4x4.
THEIR_CONV_INPUTS: dict[str, list[int]] = {
    "resnet18": [32] + [32] * 4 + [32, 16] + [16] * 2 + [16, 8] + [8] * 2 + [8, 4] + [4] * 2,
    "resnet20": [32] + [32] * 6 + [32, 16] + [16] * 4 + [16, 8] + [8] * 4,
    "wrn16_2": [32] + [32] * 4 + [32, 16] + [16] * 2 + [16, 8] + [8] * 2,
    "vgg8": [32, 16, 8, 4, 4],
    "vgg11": [32, 16, 8, 8, 4, 4, 4, 4],
    "vgg13": [32, 32, 16, 16, 8, 8, 4, 4, 4, 4],
}


def test_every_cmi_model_has_a_state_dict_here() -> None:
    assert set(THEIRS) == set(CMI_ARCHS)
    assert set(LAYOUT_ALIASES.values()) == {"stars", "cmi"}


@pytest.mark.parametrize("arch", sorted(CMI_ARCHS))
@pytest.mark.parametrize("k", [10, 100])
def test_their_weights_fit_stars_tensor_by_tensor(arch: str, k: int) -> None:
    torch.manual_seed(0)
    theirs = THEIRS[arch](k)
    model = build_teacher_arch(CMI_ARCHS[arch], num_classes=k)
    mapped = map_cmi_state(theirs, arch=arch, model=model)
    own = model.state_dict()
    assert set(mapped) == set(own), "every stars key is filled, and nothing else"
    assert len(mapped) == len(theirs), "every one of their tensors has a place"
    assert all(mapped[key].shape == own[key].shape for key in own)
    model.load_state_dict(mapped, strict=True)
    # the same values, not just the same shapes: every tensor of theirs is in the model
    stars_values = {id(v) for v in mapped.values()}
    assert all(id(v) in stars_values for v in theirs.values())
    for key, value in model.state_dict().items():
        assert torch.equal(value, mapped[key]), key


def _conv_inputs(model: nn.Module, size: int = 32) -> list[int]:
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, i, _o: sizes.append(int(i[0].shape[-1])))
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return sizes


@pytest.mark.parametrize("arch", sorted(THEIR_CONV_INPUTS))
def test_stars_runs_each_layer_at_their_feature_map_size(arch: str) -> None:
    model = build_teacher_arch(CMI_ARCHS[arch], num_classes=10)
    assert _conv_inputs(model) == THEIR_CONV_INPUTS[arch]


def test_stars_own_vgg_is_not_theirs() -> None:
    """Why ``vgg11_cmi`` exists: stars' VGG-11 max-pools once more (last convs at 2x2) and has
    no conv biases, so their checkpoints would neither load nor compute the same."""
    assert _conv_inputs(build_teacher_arch("vgg11", num_classes=10)) != THEIR_CONV_INPUTS["vgg11"]
    with pytest.raises(CheckpointError, match=r"bias -> body.0.bias"):
        map_cmi_state(
            THEIRS["vgg11"](10), arch="vgg11", model=build_teacher_arch("vgg11", num_classes=10)
        )


def test_wrong_class_count_names_the_key_and_shapes() -> None:
    model = build_teacher_arch("resnet34", num_classes=100)
    with pytest.raises(CheckpointError) as info:
        map_cmi_state(THEIRS["resnet34"](10), arch="resnet34", model=model, source="t.pth")
    msg = str(info.value)
    assert "linear.weight -> fc.weight: file (10, 512) vs resnet34 (100, 512)" in msg
    assert "t.pth" in msg and "--num-classes" in msg


def test_wrong_arch_names_the_missing_keys() -> None:
    model = build_teacher_arch("resnet34", num_classes=10)
    with pytest.raises(CheckpointError, match=r"resnet34 keys not in the file, e\.g\. \['layers\."):
        map_cmi_state(THEIRS["resnet18"](10), arch="resnet34", model=model)


@examples(20)
@given(arch=st.sampled_from(sorted(CMI_ARCHS)), data=st.data())
def test_any_dropped_or_reshaped_tensor_is_named(arch: str, data: st.DataObject) -> None:
    """Property: remove one tensor, or change one's shape, and the error names that key."""
    theirs = THEIRS[arch](10)
    key = data.draw(st.sampled_from(sorted(theirs)))
    model = build_teacher_arch(CMI_ARCHS[arch], num_classes=10)
    if data.draw(st.booleans()):
        del theirs[key]
        with pytest.raises(CheckpointError, match="not in the file") as info:
            map_cmi_state(theirs, arch=arch, model=model)
    else:
        theirs[key] = torch.zeros(*theirs[key].shape, 2)
        with pytest.raises(CheckpointError, match="shapes differ") as info:
            map_cmi_state(theirs, arch=arch, model=model)
        assert f"{key} -> " in str(info.value)


# ----------------------------------------------------------------------------- files and CLI


def _their_file(path: Path, arch: str, k: int, state: State, **extra: Any) -> Path:
    """What their train_scratch.py saves: arch, epoch, state_dict, best_acc1, optimizer..."""
    torch.save(
        {
            "epoch": 200,
            "arch": arch,
            "state_dict": state,
            "best_acc1": 0.9431,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "momentum": 0.9}]},
        }
        | extra,
        path,
    )
    return path


@pytest.mark.parametrize("layout", ["cmi", "nayer"])
def test_cli_converts_their_checkpoint_into_a_usable_teacher(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(1)
    theirs = THEIRS["wrn16_2"](10)
    src = _their_file(
        tmp_path / "cifar10_wrn16_2.pth",
        "wrn16_2",
        10,
        {f"module.{k}": v for k, v in theirs.items()},  # saved under DataParallel
    )
    out = tmp_path / "wrn.safetensors"
    result = CliRunner().invoke(
        app,
        ["convert-checkpoint", str(src), str(out), "--from", layout, "--arch", "wrn16_2",
         "--num-classes", "10"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "teacher.arch: wrn16_2" in result.output
    teacher = build_teacher(TeacherConfig(arch="wrn16_2", checkpoint=out), num_classes=10)
    own = teacher.state_dict()
    assert torch.equal(
        own["blocks.0.shortcut.weight"], theirs["block1.layer.0.convShortcut.weight"]
    )
    assert torch.equal(own["bn.running_var"], theirs["bn1.running_var"])
    assert torch.equal(own["fc.bias"], theirs["fc.bias"])


def test_cli_vgg_maps_to_the_matching_variant(tmp_path: Path) -> None:
    theirs = THEIRS["vgg11"](100)
    src = _their_file(tmp_path / "cifar100_vgg11.pth", "vgg11", 100, theirs)
    out = tmp_path / "vgg.safetensors"
    args = ["convert-checkpoint", str(src), str(out), "--from", "cmi", "--arch", "vgg11"]
    result = CliRunner().invoke(app, [*args, "--num-classes", "100"])
    assert result.exit_code == 0, result.output
    assert "teacher.arch: vgg11_cmi" in result.output
    teacher = build_teacher(TeacherConfig(arch="vgg11_cmi", checkpoint=out), num_classes=100)
    assert torch.equal(teacher.state_dict()["body.4.bias"], theirs["block1.0.bias"])


def _refused(tmp_path: Path, src: Path, *args: str) -> str:
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(app, ["convert-checkpoint", str(src), str(out), *args])
    assert result.exit_code == 2, result.output
    assert not out.exists() and not out.with_suffix(".json").exists()
    return result.output


def test_cli_refusals_name_the_problem(tmp_path: Path) -> None:
    src = _their_file(tmp_path / "r34.pth", "resnet34", 10, THEIRS["resnet34"](10))
    base = ["--from", "cmi", "--num-classes", "10"]
    assert "records arch 'resnet34', but --arch is 'resnet18'" in _refused(
        tmp_path, src, *base, "--arch", "resnet18"
    )
    assert "allowed: ['resnet18'" in _refused(tmp_path, src, *base, "--arch", "vgg16")
    assert "32x32" in _refused(tmp_path, src, *base, "--arch", "resnet34", "--image-size", "64")
    assert "--from 'timm'" in _refused(tmp_path, src, "--from", "timm", "--arch", "resnet34",
                                        "--num-classes", "10")  # fmt: skip
    assert "shapes differ" in _refused(tmp_path, src, "--from", "cmi", "--arch", "resnet34",
                                       "--num-classes", "100")  # fmt: skip


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_payload_in_their_checkpoint_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = _their_file(
        tmp_path / "evil.pth", "resnet20", 10, THEIRS["resnet20"](10), x=_Payload(marker)
    )
    output = _refused(tmp_path, src, "--from", "cmi", "--arch", "resnet20", "--num-classes", "10")
    assert "weights_only" in output and not marker.exists()


def test_python_api_returns_the_stars_arch(tmp_path: Path) -> None:
    src = _their_file(tmp_path / "r20.pth", "resnet20", 10, THEIRS["resnet20"](10))
    done = convert_checkpoint(
        src, tmp_path / "r20.safetensors", arch="resnet20", num_classes=10, layout="fast-datafree"
    )
    assert (done.arch, done.tensors) == ("resnet20", len(THEIRS["resnet20"](10)))
