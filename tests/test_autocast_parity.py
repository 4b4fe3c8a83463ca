"""The losses, the priors' statistics and the membrane replay under bf16 autocast.

The training loops run the networks under ``torch.autocast`` (``precision: bf16``) and hand
bf16 activations and logits to these functions, some of them still inside the autocast block.
They promise float32 at least (stars.synthesis.losses). Error model: a bf16 value is exact in
float32, so a function that upcasts and then computes in float32 returns, under autocast and
from bf16 inputs, bitwise what it returns for the float32 copies of those inputs outside it.
Anything autocast lowered to bf16 inside (a matmul, say) would show as a difference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from torch import Tensor, nn

from stars.distill.losses import kd_loss, student_rca, student_rca_per_step, tet_kd_loss
from stars.neurons.membrane import MembraneParams, membrane_potential
from stars.synthesis import losses as L
from stars.synthesis.priors import (
    TailLayerPrior,
    TailPrior,
    batch_stats,
    extract_bn_prior,
)
from stars.synthesis.spike_tar import (
    spike_tail_loss,
    student_firing_map,
    teacher_exceedance_map,
)

N, K, D, C, HW, T = 6, 5, 7, 3, 4, 3


def _bf16(g: torch.Generator, *shape: int, scale: float = 2.0) -> Tensor:
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


def _cases(seed: int) -> dict[str, tuple[Callable[..., Tensor], tuple[Tensor, ...]]]:
    """Each function with bf16 arguments (the other arguments fixed; a float32 argument is
    passed as it is, upcast or not)."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(C)
    bn.running_mean = torch.randn(C, generator=g)
    bn.running_var = torch.rand(C, generator=g) + 0.5
    prior = extract_bn_prior([bn])
    theta = torch.randn(2, C, generator=g)
    tau = torch.rand(C, generator=g) + 0.1
    tail = TailPrior(
        (TailLayerPrior(theta, tau, torch.rand(2, C, generator=g) * 0.8 + 0.1),), "test", (1.0,)
    )
    t_logits, s_logits = _bf16(g, N, K), _bf16(g, N, K)
    t_logits[: N // 2] = s_logits[: N // 2]  # some samples agree
    feats = _bf16(g, N, C, HW, HW)
    z_t, z_s = _bf16(g, N, D), _bf16(g, N, D + 2)
    seq = _bf16(g, T, N, D)
    x_seq, spikes = _bf16(g, T, N, C, HW), (_bf16(g, T, N, C, HW) > 0).bfloat16()
    a_s, a_t = (
        torch.rand(N, HW, HW, generator=g).bfloat16(),
        torch.rand(N, 2 * HW, 2 * HW).bfloat16(),
    )
    y = torch.randint(0, K, (N,), generator=g)
    membrane = MembraneParams(tau=2.0, decay_input=True, v_threshold=0.5, v_reset=0.0)
    return {
        "batch_stats": (lambda f: torch.stack(batch_stats(f)), (feats,)),
        "bn_matching": (lambda f: L.bn_matching([f], prior), (feats,)),
        "bn_matching_stats": (lambda f: L.bn_matching([batch_stats(f)], prior), (feats,)),
        "class_cross_entropy": (lambda t: L.class_cross_entropy(t, y), (t_logits,)),
        "adversarial_masked_kl": (
            lambda t, s: L.adversarial_masked_kl(t, s, temperature=2.0),
            (t_logits, s_logits),
        ),
        "dafl_activation": (L.dafl_activation, (z_t,)),
        "dafl_information_entropy": (L.dafl_information_entropy, (t_logits,)),
        "dfad_l1": (L.dfad_l1, (t_logits, s_logits)),
        "total_variation_l1": (lambda x: L.total_variation(x, p=1), (feats,)),
        "total_variation_l2": (lambda x: L.total_variation(x, p=2), (feats,)),
        "image_l2": (L.image_l2, (feats,)),
        "relation_matrix": (lambda z: L.relation_matrix(z, delta=1e-4), (z_t,)),
        "rca_loss": (lambda a, b: L.rca_loss(a, b, delta=1e-4), (z_t, z_s)),
        "rca_adversarial": (
            lambda a, b, t, s: L.rca_adversarial(a, b, t, s, delta=1e-4),
            (z_t, z_s, t_logits, s_logits),
        ),
        "soft_exceedance": (lambda h: L.soft_exceedance(h, theta, tau), (feats,)),
        "tar_loss": (lambda h: L.tar_loss([h], tail), (feats,)),
        "kd_loss": (lambda s, t: kd_loss(s, t, temperature=4.0), (s_logits, t_logits)),
        "tet_kd_loss": (lambda s, t: tet_kd_loss(s, t, temperature=4.0), (seq[..., :K], t_logits)),
        # the distiller upcasts the student's sequence first (student_rca averages over T in
        # the input's dtype), so these get float32 sequences, and run under autocast
        "student_rca": (lambda s, t: student_rca(s, t, delta=1e-4), (seq.float(), z_s)),
        "student_rca_per_step": (
            lambda s, t: student_rca_per_step(s, t, delta=1e-4),
            (seq.float(), z_s),
        ),
        "membrane_potential": (lambda x, s: membrane_potential(x, s, membrane), (x_seq, spikes)),
        "student_firing_map": (
            lambda x, s: student_firing_map(
                membrane_potential(x, s, membrane), v_threshold=0.5, tau=0.1
            ),
            (x_seq, spikes),
        ),
        "teacher_exceedance_map": (
            lambda h: teacher_exceedance_map(h, theta[0], tau),
            (feats,),
        ),
        "spike_tail_loss": (lambda a, b: spike_tail_loss(a, b), (a_s, a_t)),
        "spike_tail_loss_batch": (
            lambda a, b: spike_tail_loss(a, b, granularity="batch", normalize=False),
            (a_s, a_t),
        ),
    }


CASES = sorted(_cases(0))


@pytest.mark.parametrize("name", CASES)
@examples(5)
@given(seed=st.integers(0, 2**16))
def test_bf16_autocast_gives_the_float32_result(name: str, seed: int) -> None:
    fn, args = _cases(seed)[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and without a warning (e.g. an implicit softmax dim)
        want = fn(*(a.float() for a in args))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn(*args)
    assert got.dtype == want.dtype == torch.float32, name
    assert torch.equal(got, want), (name, float((got.float() - want).abs().max()))
