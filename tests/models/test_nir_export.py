"""NIR export: the graph read back by spikingjelly's importer spikes like the stars student.

Error model. The exported graph and the student compute the same function in exact
arithmetic; they round differently. Per neuron layer, with identical input spikes:

- a folded ``Conv2d`` (or ``Linear``) of fan-in ``n`` computes ``sum W'x + b'`` where the
  student computes ``(sum W x - mu) * a + beta`` (``a = gamma / sqrt(var + eps)``,
  ``W' = W a``, ``b' = beta - mu a``). Each side's dot product is off by at most
  ``gamma_n * sum |W'||x|`` (Higham, Accuracy and Stability, eq. 3.5; ``gamma_n = n u / (1 - n
  u)``, ``u`` the unit roundoff of ``tests/error_model.py``), the BN arithmetic and the stored
  ``W'``, ``b'`` by a few ``u`` more, so the input current ``X`` differs by at most
  ``dX = sum_convs 2 gamma_{n+4} (max_o ||W'_o||_1 * max|x| + max_o (|beta_o| + |mu_o a_o|))``
  (a residual block sums its two convolutions; ``max|x|`` is 1 for spikes and average-pooled
  spikes, the image's largest magnitude for the encoder; global average pooling adds its
  ``H W`` terms to a head's fan-in);
- the neuron's charge ``H[t] = V[t-1] + (X[t] - V[t-1]) / tau`` (IF: ``V + X``) carries the
  difference on with a factor <= 1 until a spike resets both sides to ``v_reset`` exactly, and
  each step's own arithmetic adds at most ``3 u (|V| + |X| + |H|) <= 9 u M`` (``M`` the
  layer's largest ``|H|`` or ``|X|``), so over ``T`` steps ``|dH| <= T (dX + 9 u M)``.

So spikes can only differ where the student's potential is within that bound of the threshold.
The tests check the bound itself (the measured ``|dH|``), that every disagreement lies within
it, and in float64 (``u = 1.1e-16``, bounds around 1e-11) that there is none: the spikes agree
exactly at every layer and step, the logits within their own bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from error_model import U32, U64
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch import Tensor, nn
from typer.testing import CliRunner

from stars.cli import app
from stars.config import NeuronConfig, StudentConfig
from stars.errors import StarsError
from stars.models.io import save_model
from stars.models.layers import ConvBN, SeqToANN, SpikingBasicBlock
from stars.models.nir_export import AVG_VARIANTS, export_nir, import_nir, node_types
from stars.models.students import build_student
from stars.neurons import MultiStepNeuron
from stars.neurons.membrane import MembraneParams, membrane_potential

K = 10


def _student(
    arch: str, *, T: int, kind: str, image_size: int, seed: int, v_reset: float | None = 0.0
) -> Any:
    """A student whose every layer fires (random BN statistics and affine terms that keep the
    currents around the threshold), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    neuron = NeuronConfig.model_validate({"kind": kind, "v_threshold": 0.5, "v_reset": v_reset})
    student: Any = build_student(
        StudentConfig(arch=arch, T=T, neuron=neuron), num_classes=K, image_size=image_size
    )
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.6, 1.4, generator=gen)
                m.bias.uniform_(-0.1, 0.5, generator=gen)
        head: Any = student.head
        if isinstance(head, nn.Sequential):  # ResNet-19's hidden layer fires too
            hidden: Any = head[0]
            hidden.bias.uniform_(0.0, 1.5, generator=gen)
    return student.eval()


def _images(student: Any, n: int, seed: int, dtype: torch.dtype) -> Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    size = student.image_size
    return (2.0 * torch.randn(n, 3, size, size, generator=gen)).to(dtype)


# ----------------------------------------------------------------------------- error model


@dataclass(frozen=True)
class _Feed:
    """A weighted layer feeding a neuron: largest row L1 norm of the folded weight, largest
    |bias| terms, fan-in, and the largest input magnitude (None: the image's)."""

    l1: float
    bias: float
    fan_in: int
    x_max: float | None


@torch.no_grad()
def _conv_feed(cbn: Any, x_max: float | None) -> _Feed:
    conv, bn = cbn.conv, cbn.bn
    a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
    w = conv.weight.double() * a[:, None, None, None]
    bias = bn.bias.double().abs() + (bn.running_mean.double() * a).abs()
    return _Feed(float(w.abs().flatten(1).sum(1).max()), float(bias.max()), w[0].numel(), x_max)


@torch.no_grad()
def _linear_feed(linear: nn.Linear, pooled: int) -> _Feed:
    w = linear.weight.double()
    bias = 0.0 if linear.bias is None else float(linear.bias.double().abs().max())
    return _Feed(float(w.abs().sum(1).max()), bias, w.shape[1] + pooled, 1.0)


def _feeds(student: Any, last_map: int) -> dict[str, list[_Feed]]:
    """The layers feeding each spiking neuron, by the neuron's name."""
    feeds: dict[str, list[_Feed]] = {"encoder_neuron": [_conv_feed(student.encoder, None)]}
    for name, module in student.named_modules():
        if isinstance(module, SpikingBasicBlock):
            feeds[f"{name}.sn1"] = [_conv_feed(module.conv1, 1.0)]
            feeds[f"{name}.sn2"] = [_conv_feed(module.conv2, 1.0)]
            if isinstance(module.shortcut, ConvBN):
                feeds[f"{name}.sn2"].append(_conv_feed(module.shortcut, 1.0))
    if hasattr(student, "features"):
        layers = list(student.features)
        for i, module in enumerate(layers):
            if isinstance(module, MultiStepNeuron):
                feeds[f"features.{i}"] = [_conv_feed(layers[i - 1], 1.0)]
    if isinstance(student.head, nn.Sequential):
        hidden = student.head[0]
        assert isinstance(hidden, nn.Linear)
        feeds["head.1"] = [_linear_feed(hidden, last_map)]
    return feeds


def _gamma(n: int, u: float) -> float:
    return n * u / (1.0 - n * u)


def _current_bound(feeds: list[_Feed], u: float, image_max: float) -> float:
    return sum(
        2.0
        * _gamma(f.fan_in + 4, u)
        * (f.l1 * (image_max if f.x_max is None else f.x_max) + f.bias)
        for f in feeds
    )


# ----------------------------------------------------------------------------- capture


@contextmanager
def _capture(modules: dict[str, nn.Module]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """``name -> (input currents, spikes)`` of each module's last call (NIR's neuron wrappers
    return ``(spikes, state)``)."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            seen[name] = (args[0], output[0] if isinstance(output, tuple) else output)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@dataclass
class _Comparison:
    layers: int
    first_mismatch: str | None
    mismatches: int
    max_rel_gap: float  # largest measured |dH| / bound over the layers compared
    logits_gap: float  # |logits difference| / bound (nan when the spikes disagreed)
    rates: dict[str, float]


def _compare(student: Any, imported: nn.Module, images: Tensor) -> _Comparison:
    """Run both networks; check the error model layer by layer in forward order, stopping at
    the first layer whose spikes disagree (further down the inputs are no longer the same)."""
    dtype = images.dtype
    u = U64 if dtype == torch.float64 else U32  # the unit roundoff (tests/error_model.py)
    T = student.T
    neurons = dict(student.spiking_neurons())
    nir_neurons = {name: imported.get_submodule(name.replace(".", "_")) for name in neurons}
    x_seq = images.unsqueeze(0).expand(T, *images.shape).contiguous()
    with torch.no_grad(), _capture(neurons) as ours, _capture(nir_neurons) as theirs:
        logits = student(images)
        nir_logits, _ = imported(x_seq)
    last_map = next(s.shape[-2] * s.shape[-1] for _, s in reversed(ours.values()) if s.dim() == 5)
    feeds = _feeds(student, last_map)
    assert set(feeds) == set(neurons), "every neuron's feeding layers are known"
    image_max = float(images.abs().max())
    worst, first, count = 0.0, None, 0
    for name, module in neurons.items():
        params = MembraneParams.of(module)
        x_s, s_s = ours[name]
        x_n, s_n = theirs[name]
        assert s_n.shape == s_s.shape, name
        h_s = membrane_potential(x_s, s_s, params)
        h_n = membrane_potential(x_n.to(dtype), s_n.to(dtype), params)
        scale = max(float(h_s.abs().max()), float(x_s.abs().max()))
        bound = T * (_current_bound(feeds[name], u, image_max) + 9 * u * scale)
        gap = float((h_s - h_n).abs().max())
        assert gap <= bound, f"{name}: |dH| = {gap:.3g} exceeds the error bound {bound:.3g}"
        worst = max(worst, gap / bound)
        differ = s_s != s_n.to(s_s.dtype)
        if bool(differ.any()):
            margin = (h_s - params.v_threshold).abs()[differ]
            assert float(margin.max()) <= bound, (
                f"{name}: a spike differs where the potential is {float(margin.max()):.3g} from "
                f"the threshold, beyond the error bound {bound:.3g}"
            )
            first, count = name, int(differ.sum())
            break
    head = student.head if isinstance(student.head, nn.Linear) else student.head[-1]
    logit_bound = _current_bound([_linear_feed(head, last_map)], u, 1.0)
    logits_gap = float("nan")
    if first is None:
        logits_gap = float((logits - nir_logits).abs().max()) / logit_bound
        assert logits_gap <= 1.0, f"logits differ by {logits_gap:.3g} x their bound"
    rates = {name: float(ours[name][1].float().mean()) for name in neurons}
    return _Comparison(len(neurons), first, count, worst, logits_gap, rates)


def _assert_exact(result: _Comparison) -> None:
    assert result.first_mismatch is None, (
        f"{result.mismatches} spikes differ at {result.first_mismatch}"
    )
    # the comparison means something only if every layer actually fires
    assert all(0.01 < r < 0.99 for r in result.rates.values()), result.rates


# ----------------------------------------------------------------------------- round trip


ARCHS = [
    # arch, neuron kind, image size (ResNets at 16 px to keep the test fast; a VGG's five
    # pools need 32)
    ("spiking_tiny_avg", "lif", 16),
    ("spiking_resnet20", "if", 16),
    ("spiking_resnet18", "lif", 16),
    ("spiking_resnet19", "plif", 16),
    ("spiking_vgg11_avg", "if", 32),
    ("spiking_vgg16_avg", "lif", 32),
]
"""Every exportable student architecture (the max-pool ones are refused, tested below)."""

EXPECTED_NODES = {
    "spiking_tiny_avg": {
        "Input": 1, "Conv2d": 4, "LIF": 4, "AvgPool2d": 4, "Flatten": 1, "Affine": 1, "Output": 1,
    },
    "spiking_resnet20": {
        "Input": 1, "Conv2d": 21, "IF": 19, "AvgPool2d": 1, "Flatten": 1, "Affine": 1, "Output": 1,
    },
    "spiking_resnet18": {
        "Input": 1, "Conv2d": 20, "LIF": 17, "AvgPool2d": 1, "Flatten": 1, "Affine": 1, "Output": 1,
    },
    "spiking_resnet19": {
        "Input": 1, "Conv2d": 19, "LIF": 18, "AvgPool2d": 1, "Flatten": 1, "Affine": 2, "Output": 1,
    },
    "spiking_vgg11_avg": {
        "Input": 1, "Conv2d": 8, "IF": 8, "AvgPool2d": 6, "Flatten": 1, "Affine": 1, "Output": 1,
    },
    "spiking_vgg16_avg": {
        "Input": 1, "Conv2d": 13, "LIF": 13, "AvgPool2d": 6, "Flatten": 1, "Affine": 1, "Output": 1,
    },
}  # fmt: skip
"""NIR node types per architecture: a conv per conv + BN pair (ResNets: also each projection
shortcut), a neuron per spiking layer (PLIF is a LIF in NIR), the 2x2 pools plus the global
average pool, the head's Affine layers."""


@pytest.mark.parametrize(("arch", "kind", "size"), ARCHS)
def test_round_trip_spikes_exactly_in_float64(arch: str, kind: str, size: int) -> None:
    student = _student(arch, T=3, kind=kind, image_size=size, seed=0).double()
    graph = export_nir(student, dtype=torch.float64)
    assert node_types(graph) == EXPECTED_NODES[arch]
    result = _compare(
        student, import_nir(graph, dtype=torch.float64), _images(student, 2, 0, torch.float64)
    )
    _assert_exact(result)


@examples(6)
@given(
    seed=st.integers(0, 2**16),
    T=st.integers(1, 5),
    kind=st.sampled_from(["lif", "if", "plif"]),
)
def test_round_trip_property(seed: int, T: int, kind: str) -> None:
    """Any seed, T and neuron: float64 spikes agree exactly at every layer and step."""
    student = _student("spiking_tiny_avg", T=T, kind=kind, image_size=16, seed=seed).double()
    graph = export_nir(student, dtype=torch.float64)
    result = _compare(
        student, import_nir(graph, dtype=torch.float64), _images(student, 2, seed, torch.float64)
    )
    assert result.first_mismatch is None, result


def _save_student(student: Any, path: Path, arch: str, kind: str) -> None:
    neuron = NeuronConfig.model_validate({"kind": kind, "v_threshold": 0.5})
    meta = {
        "kind": "student",
        "arch": arch,
        "T": student.T,
        "neuron": neuron.model_dump(mode="json"),
        "num_classes": K,
        "image_size": student.image_size,
    }
    save_model(student, path, meta)


def test_cli_exports_a_file_that_reads_back(tmp_path: Path) -> None:
    """``stars export`` writes float32 HDF5; read back, it spikes like the float32 student
    wherever the error model decides the spike (and the file's weights are the folded ones)."""
    student = _student("spiking_tiny_avg", T=4, kind="lif", image_size=16, seed=3)
    weights, out = tmp_path / "student.safetensors", tmp_path / "out" / "student.nir"
    _save_student(student, weights, "spiking_tiny_avg", "lif")
    result = CliRunner().invoke(app, ["export", str(weights), "--format", "nir", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "LIF: 4" in result.output
    imported = import_nir(out)
    comparison = _compare(student, imported, _images(student, 4, 3, torch.float32))
    assert comparison.max_rel_gap <= 1.0
    enc: Any = imported.get_submodule("encoder")
    folded = export_nir(student.double(), dtype=torch.float64).nodes["encoder"].weight
    assert torch.equal(enc.weight, torch.from_numpy(folded).float())


def test_soft_reset_is_refused_with_the_field() -> None:
    student = _student("spiking_tiny_avg", T=2, kind="lif", image_size=16, seed=0, v_reset=None)
    with pytest.raises(StarsError, match=r"encoder_neuron: soft reset \(student.neuron.v_reset"):
        export_nir(student)


@pytest.mark.parametrize("arch", sorted(AVG_VARIANTS))
def test_max_pooling_is_refused_naming_the_layer(arch: str) -> None:
    student = _student(arch, T=1, kind="if", image_size=32, seed=0)
    first = next(
        i for i, m in enumerate(student.features) if isinstance(m, SeqToANN)
    )  # the first pool of the layout, a max-pool
    with pytest.raises(StarsError, match=rf"features\.{first}: MaxPool2d cannot be exported"):
        export_nir(student)
    with pytest.raises(StarsError, match=rf"{arch} -> {AVG_VARIANTS[arch]}"):
        export_nir(student)


def test_cli_refusal_writes_nothing(tmp_path: Path) -> None:
    student = _student("spiking_tiny", T=1, kind="lif", image_size=16, seed=0)
    weights, out = tmp_path / "student.safetensors", tmp_path / "student.nir"
    _save_student(student, weights, "spiking_tiny", "lif")
    result = CliRunner().invoke(app, ["export", str(weights), "--format", "nir", str(out)])
    assert result.exit_code == 2
    assert "features.0: MaxPool2d" in result.output
    assert "spiking_tiny -> spiking_tiny_avg" in result.output
    assert set(tmp_path.iterdir()) == {weights, weights.with_suffix(".json")}


def test_cli_refuses_a_teacher(tmp_path: Path, teacher_file: Path) -> None:
    result = CliRunner().invoke(
        app, ["export", str(teacher_file), "--format", "nir", str(tmp_path / "t.nir")]
    )
    assert result.exit_code == 2
    assert "student" in result.output and not (tmp_path / "t.nir").exists()
