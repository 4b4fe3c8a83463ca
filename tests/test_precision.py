"""precision (bf16 autocast), channels_last and compile options, on the CPU."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_run import STARS_ON, records, tiny_run_config

from stars.config import load_config
from stars.pipeline import build_components
from stars.recipes.distill import run_distill
from stars.runtime import CompiledModel
from stars.synthesis.methods.fast import FastSynthesizer
from stars.synthesis.priors import batch_stats, compiled_batch_stats


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory: pytest.TempPathFactory, teacher_file: Path) -> Path:
    return tiny_run_config(
        tmp_path_factory.mktemp("prec"),
        teacher_file,
        stars=STARS_ON,
        distill={"epochs": 2, "kd_steps_per_epoch": 2, "batch_size": 8},
    )


def test_bf16_and_channels_last_run_on_cpu(cfg_path: Path) -> None:
    cfg = load_config(cfg_path, ["precision=bf16", "channels_last=true", "name=bf16"])
    comp = build_components(cfg)
    conv = next(m for m in comp.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    result = run_distill(cfg, show_progress=False)
    epochs = records(result.run_dir, "epoch")
    assert len(epochs) == 2
    assert all(math.isfinite(v) for r in epochs for k, v in r.items() if k.startswith("kd/"))
    assert result.summary["skipped_kd_steps"] == 0


@pytest.mark.parametrize("value", ["generator", "true"])
def test_channels_last_generator(cfg_path: Path, value: str) -> None:
    """The generator's convolutions take channels-last inputs for the call only; its weights
    stay as they were; the images come back contiguous; ``generator`` leaves the teacher and
    the student alone (``true`` converts them as well)."""
    comp = build_components(load_config(cfg_path, [f"channels_last={value}"]))
    synth = comp.synthesizer
    assert isinstance(synth, FastSynthesizer)
    ctx = synth.ctx
    assert ctx.channels_last
    student_conv = next(m for m in comp.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert student_conv.weight.is_contiguous(memory_format=torch.channels_last) == (
        value == "true"
    ) and student_conv.weight.is_contiguous() == (value == "generator")
    gen = synth.generator
    convs = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)]
    seen: list[bool] = []
    spies = [
        m.register_forward_hook(
            lambda m, a, o: seen.append(a[0].is_contiguous(memory_format=torch.channels_last))
        )
        for m in convs
    ]
    before = {k: (v.detach().clone(), v.stride()) for k, v in gen.named_parameters()}
    z = torch.randn(4, gen.nz, generator=torch.Generator().manual_seed(0))
    x = ctx.generate(gen, z)
    for spy in spies:
        spy.remove()
    assert seen == [True] * len(convs) and len(convs) >= 2
    assert x.is_contiguous() and x.dtype == torch.float32
    assert all(len(m._forward_pre_hooks) == 0 for m in convs), "the hooks outlive the call"
    for name, param in gen.named_parameters():
        assert torch.equal(param, before[name][0]) and param.stride() == before[name][1], name

    # the same function: in float64 (rounding ~1e-16, amplified by at most the fan-in
    # 9 * channels <= 1e4 per convolution) the two layouts agree far below one float32 ulp of
    # the images, so after the cast to float32 they differ by at most that one ulp
    gen64 = gen.double()
    ctx.channels_last = False
    plain = ctx.generate(gen64, z.double())
    ctx.channels_last = True
    cl = ctx.generate(gen64, z.double())
    ulp = torch.finfo(torch.float32).eps * plain.abs().clamp_min(1.0)
    assert bool(((cl - plain).abs() <= ulp).all())


def test_bf16_changes_the_numbers(cfg_path: Path) -> None:
    a = build_components(load_config(cfg_path, ["precision=fp32"]))
    b = build_components(load_config(cfg_path, ["precision=bf16"]))
    sa, sb = a.synthesizer.synthesize(a.student), b.synthesizer.synthesize(b.student)
    assert sa.losses["bn"] != sb.losses["bn"], "autocast must actually be in effect"
    assert abs(sa.losses["bn"] - sb.losses["bn"]) < 0.05 * abs(sa.losses["bn"]) + 1e-3


def test_compile_failure_falls_back_with_a_warning(cfg_path: Path, broken_compile: None) -> None:
    eager = build_components(load_config(cfg_path))
    comp = build_components(load_config(cfg_path, ["compile=true"]))
    x = torch.randn(3, 3, 32, 32)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        comp.teacher(x)
    # on the CPU the student's layers stay eager and only its neurons are compiled: the
    # failing neuron kernels fall back to the same function, eagerly
    assert not isinstance(comp.student, CompiledModel)
    with pytest.warns(UserWarning, match="torch.compile failed for the neuron kernel"):
        out = comp.student(x)
    # the same spikes as the eager operator (no potential of this input is within float32
    # rounding of the threshold), hence the same logits
    assert torch.equal(out, eager.student(x))
    assert comp.student.state_dict().keys() == eager.student.state_dict().keys()
    n_bn = len(comp.student.bn_layers())
    assert n_bn == len(eager.student.bn_layers())
    # the objective's BN statistics fall back to the eager function: the same numbers
    with pytest.warns(UserWarning, match="torch.compile failed for the BN statistics"):
        mean, var = compiled_batch_stats(x)
    want_mean, want_var = batch_stats(x)
    assert torch.equal(mean, want_mean) and torch.equal(var, want_var)


def test_compile_uses_the_compiled_function(
    cfg_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_kernels: None
) -> None:
    calls: list[str] = []

    def fake_compile(fn: Any, *args: Any, **kwargs: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            calls.append(getattr(fn, "__name__", "?"))
            return fn(*a, **k)

        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    comp = build_components(load_config(cfg_path, ["compile=true"]))
    comp.synthesizer.synthesize(comp.student)
    comp.distiller.step(comp.synthesizer.sample(8))
    assert "forward_features" in calls  # the teacher's
    assert {"_sequence_spikes", "_sequence_input_grad"} <= set(calls)  # the neurons'
    assert "batch_stats" in calls  # the synthesis objective's BN statistics
    # the gradient diagnostics take the statistics eagerly, as they take the teacher
    calls.clear()
    x = comp.synthesizer.sample(8)
    comp.synthesizer.objective.grad_norms(x, comp.teacher(x).argmax(1), comp.student)
    assert "batch_stats" not in calls and "forward_features" not in calls
    assert isinstance(comp.teacher, CompiledModel)
    assert all(n.compiled for _, n in comp.student.spiking_neurons())


def test_the_gradient_diagnostics_run_through_the_compiled_teacher(
    cfg_path: Path, fresh_kernels: None
) -> None:
    """``grad_norms`` (the calibration at synthesis and the end-of-run ``term_gradients``)
    differentiates each term with ``retain_graph=True``, which a compiled graph that donates
    its buffers to backward refuses. A real compile: the norms match the eager teacher's.

    Error model: inductor reorders the float32 sums of the forward and backward; over this
    teacher's reductions (at most a few thousand terms) that moves each norm by far less than
    n u = 4096 * 2^-24 < 3e-4 relative, so rtol 1e-3."""
    from stars.recipes.distill import term_gradients

    eager = build_components(load_config(cfg_path))
    comp = build_components(load_config(cfg_path, ["compile=true"]))
    comp.student.load_state_dict(eager.student.state_dict())
    assert isinstance(comp.teacher, CompiledModel)
    for c in (eager, comp):
        c.synthesizer.synthesize(c.student)
    x = eager.synthesizer.sample(8)
    y = eager.teacher(x).argmax(1)
    want = eager.synthesizer.objective.grad_norms(x, y, eager.student)
    got = comp.synthesizer.objective.grad_norms(x, y, comp.student)
    assert set(got) == set(want) and "bn" in want
    for name, value in want.items():
        assert math.isclose(got[name], value, rel_tol=1e-3, abs_tol=1e-6), name
    assert term_gradients(comp)  # the end-of-run record, on the compiled components
