"""The synthetic set's quality report (stars.synthesis.quality) on a tiny teacher.

Error model (tests/error_model.py). The report accumulates each BN input's per-channel sums
in float64 over chunks and casts the statistics to float32; the reference here takes
float64 statistics of the same float32 activations. Where the report runs one forward over
the whole set (``batch_size >= N``) it is the reference's own call, so activations, logits
and features are the reference's bit for bit (a CPU kernel is deterministic for a given
shape): counts, agreement, confidences and diversities are then compared exactly, and the
statistics differ only by float64 rounding and the float32 cast (:func:`_bn_loss_tol`).
Across chunk sizes the activations themselves may differ by the kernels' reduction order;
the test measures that difference ``delta`` and bounds each figure's change by it.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from error_model import U32, U64, mean_error, relation_error, variance_error
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_budget import examples
from PIL import Image
from torch import Tensor

from stars.config import TARConfig
from stars.data.datasets import eval_transform
from stars.models.factory import freeze
from stars.models.teachers import CifarResNet
from stars.synthesis.losses import bn_matching
from stars.synthesis.priors import FeatureTap, extract_bn_prior, extract_tail_prior
from stars.synthesis.quality import (
    mean_pairwise_cosine_distance,
    normalize_pixels,
    quality_report,
    quality_tables,
)

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
SIZE, K = 16, 4
NAMES = ("ant", "bee", "cat", "dog")
TAR = TARConfig(kappas=(1.0, 2.0))


@functools.cache
def _teacher() -> CifarResNet:
    """A ResNet-8 whose BN running statistics come from a few random batches."""
    torch.manual_seed(0)
    t = CifarResNet(8, num_classes=K, image_size=SIZE)
    t.train()
    with torch.no_grad():
        for _ in range(3):
            t(torch.randn(8, 3, SIZE, SIZE) * 1.5 + 0.3)
    return freeze(t)


def _set(n: int = 23, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, K - 1, (n,), generator=g)  # class 3 gets no image
    return pixels, labels


def _brute_distance(f: Tensor) -> float:
    u = F.normalize(f.double(), dim=1)
    cos = u @ u.T
    n = f.shape[0]
    off = cos.sum() - cos.diagonal().sum()
    return 1.0 - float(off) / (n * (n - 1))


def _distance_tol(n: int, d: int) -> float:
    """float64 bound between the O(N D) identity and the brute-force mean (error model).

    Brute force: each cosine within ``e = relation_error(d)`` of the exact one, a sum of
    ``n^2`` of them (``|cos| <= 1 + e``) adds ``n^2 u n^2``, the diagonal's ``n`` terms less;
    divided by ``n (n - 1) >= n^2 / 2``: ``2 e + 4 n^2 u``. The identity: unit rows within
    ``(d + 2) u``, their sum (``|.| <= n`` per component) within ``n (d + n + 1) u`` per
    component, its squared norm (``<= n^2``, ``d`` terms) within ``n^2 (d + 2 sqrt(d)
    (d + n + 1)) u``, the diagonal within ``n (d + n + 2) u``; divided as above.
    """
    brute = 2 * relation_error(d, U64) + 4 * n * n * U64
    ours = 2 * (d + 2 * math.sqrt(d) * (d + n + 1) + (d + n + 2) / n) * U64
    return brute + ours


@examples(40)
@given(
    n=st.integers(2, 30),
    d=st.integers(1, 8),
    zeros=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_pairwise_distance_matches_the_pairwise_mean(n: int, d: int, zeros: int, seed: int) -> None:
    """The O(N D) identity equals the mean over all N(N-1) ordered pairs."""
    f = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    f[: min(zeros, n)] = 0  # a zero feature (ReLU) has cosine 0 with everything
    got = mean_pairwise_cosine_distance(f)
    assert got == pytest.approx(_brute_distance(f), abs=_distance_tol(n, d))


def test_pairwise_distance_extremes() -> None:
    same = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])
    assert mean_pairwise_cosine_distance(same) == pytest.approx(0.0, abs=_distance_tol(3, 2))
    assert mean_pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [-3.0, 0.0]])) == 2.0
    assert mean_pairwise_cosine_distance(torch.eye(5)) == pytest.approx(
        1.0, abs=_distance_tol(5, 5)
    )
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_cosine_distance(torch.ones(1, 3))


def test_normalize_pixels_is_what_evaluation_applies() -> None:
    """The report's teacher sees bit for bit what `stars evaluate` feeds it from the PNGs."""
    pixels, _ = _set(4)
    ours = normalize_pixels(pixels, MEAN, STD)
    tf = eval_transform(SIZE, MEAN, STD)
    for i in range(4):
        img = Image.fromarray(pixels[i].permute(1, 2, 0).numpy())
        assert torch.equal(ours[i], tf(img))


def _reference(pixels: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Forwards over chunks of ``chunk`` images (default: one over the whole set), as the
    report makes them: features, logits and every BN layer's input."""
    t = _teacher()
    layers = list(t.bn_layers())
    step = chunk or pixels.shape[0]
    parts: list[tuple[Tensor, Tensor, list[Tensor]]] = []
    for start in range(0, pixels.shape[0], step):
        x = normalize_pixels(pixels[start : start + step], MEAN, STD)
        with torch.no_grad(), FeatureTap(layers, detach=True) as tap:
            feats, logits = t.forward_features(x)
            parts.append((feats, logits, [tap[m].clone() for m in layers]))
    return (
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        [torch.cat([p[2][i] for p in parts]) for i in range(len(layers))],
    )


def _stats64(a: Tensor) -> tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(a.double(), dim=(0, 2, 3), unbiased=False)
    return mean, var


def _bn_loss_tol(acts: list[Tensor], loss: float, delta: list[float] | None = None) -> float:
    """Bound between the report's BN loss and :func:`bn_matching` of float64 statistics of
    ``acts`` cast to float32 (error model).

    Per layer (``m`` values per channel, ``|x| <= a``): the report's float64 mean and
    one-pass variance are within ``mean_error(m, a, U64)`` and ``variance_error(m, a, U64)``
    (its ``m`` squares and the subtracted square of the mean, ``<= (3 m + 3) u a^2``), the
    reference's likewise; each side's cast rounds by ``u |x|``. Activations that differ by
    up to ``delta`` (another chunking) move a mean by ``delta`` and a variance
    (``E[x^2] - mean^2``) by ``4 a delta + 2 delta^2``. A per-channel change ``e`` moves an
    L2 norm over ``C`` channels by ``sqrt(C) e``. Each side's float32 ``bn_matching`` (a
    difference, ``C`` squares, a root, then ``2 L`` norms summed) is within
    ``(C + 3 + 2 L) u loss`` of the exact value for its input.
    """
    tol = 0.0
    for i, a in enumerate(acts):
        m, c = a.numel() // a.shape[1], a.shape[1]
        d = delta[i] if delta else 0.0
        amax = float(a.abs().max()) + d
        mean, var = _stats64(a)
        e_mean = 2 * mean_error(m, amax, U64) + 2 * U32 * float(mean.abs().max()) + d
        e_var = (
            2 * variance_error(m, amax, U64) + 2 * U32 * float(var.max()) + 4 * amax * d + 2 * d * d
        )
        tol += math.sqrt(c) * (e_mean + e_var)
    c_max = max(a.shape[1] for a in acts)
    return tol + 2 * (c_max + 3 + 2 * len(acts)) * U32 * abs(loss)


def test_report_fields_on_a_tiny_teacher() -> None:
    pixels, labels = _set()
    n = pixels.shape[0]
    report = quality_report(
        _teacher(), pixels, labels, mean=MEAN, std=STD, tail=TAR, class_names=NAMES, batch_size=n
    )
    feats, logits, acts = _reference(pixels)
    prob = logits.float().softmax(1)

    assert report.num_images == n
    assert report.teacher_agreement == 100.0 * int((logits.argmax(1) == labels).sum()) / n
    assert report.teacher_confidence == float(prob.max(1).values.double().mean())
    counts = torch.bincount(labels, minlength=K).tolist()
    assert [c.count for c in report.per_class] == counts
    assert [c.name for c in report.per_class] == list(NAMES)
    for c, row in enumerate(report.per_class[:3]):
        mask = labels == c
        hits = int((logits.argmax(1)[mask] == c).sum())
        assert row.agreement == 100.0 * hits / counts[c]
        assert row.confidence == float(prob[mask].max(1).values.double().mean())
        assert row.diversity == mean_pairwise_cosine_distance(feats[mask])
    empty = report.per_class[3]
    assert empty.count == 0 and math.isnan(empty.agreement) and empty.diversity is None

    prior = extract_bn_prior(_teacher())
    stats = [(m.float(), v.float()) for m, v in map(_stats64, acts)]
    expected_bn = float(bn_matching(stats, prior))
    assert report.bn_loss == pytest.approx(expected_bn, rel=0, abs=_bn_loss_tol(acts, expected_bn))
    assert len(report.bn_loss_per_layer) == len(acts)
    # L float32 terms summed in another order: within 2 L u of the total
    sum_tol = 2 * len(acts) * U32 * report.bn_loss
    assert sum(report.bn_loss_per_layer) == pytest.approx(report.bn_loss, rel=0, abs=sum_tol)

    tail = extract_tail_prior(prior, TAR)
    assert report.tail_masses.levels == (1.0, 2.0)
    for layer, a, t, p in zip(
        report.tail_masses.measured, acts, tail.layers, report.tail_masses.prior, strict=True
    ):
        m, c = a.numel() // a.shape[1], a.shape[1]
        tol = 2 * (mean_error(m, 1.0, U64) + mean_error(c, 1.0, U64))  # the same counts
        for k in range(2):
            above = (a > t.theta[k].view(1, -1, 1, 1)).double().mean((0, 2, 3)).mean()
            assert layer[k] == pytest.approx(float(above), rel=0, abs=tol)
        assert p == t.p.double().mean(1).tolist()  # the prior's targets, passed through
    assert report.tail_masses.prior[0][0] > report.tail_masses.prior[0][1] > 0

    assert report.diversity_overall == mean_pairwise_cosine_distance(feats)
    within = [c.diversity for c in report.per_class if c.diversity is not None]
    assert report.diversity_within_class == sum(within) / len(within)


def test_report_does_not_depend_on_the_chunk_size() -> None:
    """Chunks of 4 against one chunk of 31: every figure moves at most as far as the
    activations of the two chunkings differ (``delta``, measured; 0 when the kernels give
    the same bits)."""
    pixels, labels = _set(31, seed=3)
    args = {"mean": MEAN, "std": STD, "tail": TAR, "class_names": NAMES}
    a = quality_report(_teacher(), pixels, labels, batch_size=4, **args)  # type: ignore[arg-type]
    b = quality_report(_teacher(), pixels, labels, batch_size=31, **args)  # type: ignore[arg-type]
    _, logits4, acts4 = _reference(pixels, 4)
    _, logits, acts = _reference(pixels)
    delta = [float((x - y).abs().max()) for x, y in zip(acts4, acts, strict=True)]
    d_logit = float((logits4 - logits).abs().max())

    # an argmax can change only where the top two logits are within 2 d_logit
    top2 = logits.topk(2, dim=1).values
    close = int(((top2[:, 0] - top2[:, 1]) <= 2 * d_logit).sum())
    assert abs(a.teacher_agreement - b.teacher_agreement) <= 100.0 * close / 31
    tol = _bn_loss_tol(acts, b.bn_loss, delta) + _bn_loss_tol(acts, b.bn_loss)
    assert a.bn_loss == pytest.approx(b.bn_loss, rel=0, abs=tol)
    prior = extract_tail_prior(extract_bn_prior(_teacher()), TAR)
    for ra, rb, x, d, t in zip(
        a.tail_masses.measured, b.tail_masses.measured, acts, delta, prior.layers, strict=True
    ):
        m, c = x.numel() // x.shape[1], x.shape[1]
        for k in range(2):
            # a count changes only for values within delta of a threshold
            near = ((x - t.theta[k].view(1, -1, 1, 1)).abs() <= d).double().mean((0, 2, 3))
            tol = float(near.mean()) + 4 * (mean_error(m, 1.0, U64) + mean_error(c, 1.0, U64))
            assert ra[k] == pytest.approx(rb[k], rel=0, abs=tol)


def test_report_json_and_tables() -> None:
    pixels, labels = _set()
    report = quality_report(
        _teacher(), pixels, labels, mean=MEAN, std=STD, tail=TAR, class_names=NAMES
    )
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["counts"] == dict(
        zip(NAMES, torch.bincount(labels, minlength=K).tolist(), strict=True)
    )
    assert data["per_class"][3]["agreement"] is None  # no image of the class: null, not NaN
    assert len(data["tail_masses"]["mean_measured"]) == 2
    assert data["bn_loss"] == report.bn_loss
    per_class, overall = quality_tables(report)
    assert per_class.row_count == K
    assert overall.row_count == 7  # images, agreement, confidence, BN, diversity, 2 tail levels


def test_report_refuses_mismatched_input() -> None:
    pixels, labels = _set(5)
    with pytest.raises(ValueError, match="5 images and 4 labels"):
        quality_report(
            _teacher(), pixels, labels[:4], mean=MEAN, std=STD, tail=TAR, class_names=NAMES
        )
