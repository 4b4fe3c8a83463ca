"""How good a synthetic dataset is, in the teacher's eyes (``quality.json``).

For uint8 images ``[N, C, H, W]`` with their intended labels ``[N]``, one pass of the frozen
teacher over the set (normalized exactly as ``stars evaluate`` normalizes a folder) gives:

- **teacher agreement**: the share of images (%) whose teacher argmax is the intended label
  (``stars evaluate TEACHER --data SET`` reports the same figure as its top-1);
- **teacher confidence**: the mean over images of the teacher's largest softmax probability;
- **BN loss**: :func:`~stars.synthesis.losses.bn_matching` of the whole set's statistics
  (per channel mean and biased variance of every BN layer's input over all ``N x H x W``
  positions, accumulated exactly over chunks) against the teacher's running statistics, so
  the figure does not depend on a batch size; also per layer;
- **tail masses**: per BN layer and level ``k``, the share of the layer's input above the
  TAR thresholds ``theta[k, c]`` (the config's ``stars.tar`` prior, as a hard count), mean
  over channels, beside the prior's target mass ``p[k, c]`` (mean over channels);
- **diversity**: the mean pairwise cosine distance ``1 - cos(f_i, f_j)`` over pairs
  ``i != j`` of the teacher's penultimate features, within each class and over all images;
- per class: count, agreement, confidence and diversity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor, nn

from stars.config import TARConfig
from stars.models.protocols import Teacher
from stars.synthesis.losses import bn_matching
from stars.synthesis.priors import BNPrior, FeatureTap, extract_bn_prior, extract_tail_prior

__all__ = [
    "ClassQuality",
    "QualityReport",
    "TailMasses",
    "mean_pairwise_cosine_distance",
    "normalize_pixels",
    "quality_report",
    "quality_tables",
]


@dataclass(frozen=True)
class ClassQuality:
    """One class of the set.

    Attributes:
        name: the class name.
        count: images of the class.
        agreement: % of them the teacher assigns to the class (nan when ``count`` is 0).
        confidence: their mean largest teacher probability (nan when ``count`` is 0).
        diversity: their mean pairwise cosine distance (None with fewer than 2 images).
    """

    name: str
    count: int
    agreement: float
    confidence: float
    diversity: float | None


@dataclass(frozen=True)
class TailMasses:
    """Tail masses of the set at the TAR prior's thresholds.

    Attributes:
        source: the prior's ``stars.tar.source``.
        levels: the prior's levels (kappas, masses or ``(v_th,)``), one per column.
        measured: ``[L][K]`` share of each BN layer's input above ``theta[k]``, mean over
            channels.
        prior: ``[L][K]`` the prior's target masses, mean over channels.
    """

    source: str
    levels: tuple[float, ...]
    measured: list[list[float]]
    prior: list[list[float]]

    def mean_over_layers(self) -> tuple[list[float], list[float]]:
        """``(measured [K], prior [K])``: each level's mass averaged over the layers."""
        n = len(self.measured)
        cols = range(len(self.levels))
        return (
            [sum(row[k] for row in self.measured) / n for k in cols],
            [sum(row[k] for row in self.prior) / n for k in cols],
        )


@dataclass(frozen=True)
class QualityReport:
    """What :func:`quality_report` measures (module docstring); ``to_dict`` is the JSON."""

    num_images: int
    teacher_agreement: float
    teacher_confidence: float
    bn_loss: float
    bn_loss_per_layer: list[float]
    tail_masses: TailMasses
    diversity_overall: float | None
    diversity_within_class: float | None
    per_class: list[ClassQuality]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (nan becomes null)."""
        data = asdict(self)
        measured, prior = self.tail_masses.mean_over_layers()
        data["tail_masses"]["mean_measured"] = measured
        data["tail_masses"]["mean_prior"] = prior
        data["counts"] = {c.name: c.count for c in self.per_class}
        clean: dict[str, Any] = _no_nan(data)
        return clean


def _no_nan(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_no_nan(v) for v in x]
    return x


def normalize_pixels(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 normalized images, with torchvision's own
    ``to_dtype(scale=True)`` and ``normalize`` (what evaluation applies to a folder, so the
    teacher sees the same floats either way)."""
    from torchvision.transforms.v2 import functional as TF

    x = TF.to_dtype(pixels, torch.float32, scale=True)
    out: Tensor = TF.normalize(x, list(mean), list(std))
    return out


def mean_pairwise_cosine_distance(feats: Tensor) -> float:
    """``1 - mean_{i != j} cos(f_i, f_j)`` for features ``[N, D]`` (N >= 2).

    Computed in O(N D) in float64: with unit vectors ``u_i`` (a zero vector stays zero, so
    its cosine with anything counts as 0), ``sum_{i != j} u_i . u_j = |sum_i u_i|^2 -
    sum_i |u_i|^2``. Ranges over ``[0, 2]``: 0 when every feature points the same way.

    Raises:
        ValueError: fewer than two rows.
    """
    n = feats.shape[0]
    if n < 2:
        raise ValueError(f"a pairwise distance needs at least 2 features, got {n}")
    u = F.normalize(feats.detach().to(torch.float64).flatten(1), dim=1)
    total = u.sum(0)
    pairs = float(total @ total) - float((u * u).sum())
    return 1.0 - pairs / (n * (n - 1))


@dataclass
class _Accumulator:
    """Exact running sums over chunks for one BN layer."""

    s1: Tensor
    s2: Tensor
    exceed: Tensor
    count: int = 0


@torch.no_grad()
def quality_report(
    teacher: Teacher,
    pixels: Tensor,
    labels: Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    tail: TARConfig,
    class_names: Sequence[str],
    student_vth: float | None = None,
    device: torch.device | None = None,
    batch_size: int = 250,
) -> QualityReport:
    """Measure a synthetic set (module docstring).

    Args:
        teacher: the frozen teacher (``forward_features``, ``bn_layers()``), in eval mode.
        pixels: uint8 images ``[N, C, H, W]``.
        labels: intended labels ``[N]`` in ``0..K-1``.
        mean, std: the teacher's input normalization.
        tail: the TAR config whose prior gives the thresholds (``stars.tar``).
        class_names: the ``K`` class names, in label order.
        student_vth: the student's threshold (only for ``tail.source: student-vth``).
        device: where the teacher runs (default: where its parameters are).
        batch_size: images per forward pass (the figures do not depend on it).

    Returns:
        The :class:`QualityReport`.
    """
    if pixels.shape[0] == 0 or pixels.shape[0] != labels.shape[0]:
        raise ValueError(f"{pixels.shape[0]} images and {labels.shape[0]} labels")
    dev = device or next(teacher.parameters()).device
    bn_layers: list[nn.Module] = list(teacher.bn_layers())
    bn_prior = extract_bn_prior(bn_layers).to(dev)
    tail_prior = extract_tail_prior(bn_prior, tail, student_vth=student_vth)
    acc = [
        _Accumulator(
            torch.zeros(layer.num_channels, dtype=torch.float64, device=dev),
            torch.zeros(layer.num_channels, dtype=torch.float64, device=dev),
            torch.zeros(tuple(t.theta.shape), dtype=torch.float64, device=dev),
        )
        for layer, t in zip(bn_prior.layers, tail_prior.layers, strict=True)
    ]
    feats, conf, pred = [], [], []
    was = teacher.training
    teacher.eval()
    try:
        for start in range(0, pixels.shape[0], batch_size):
            x = normalize_pixels(pixels[start : start + batch_size], mean, std).to(dev)
            with FeatureTap(bn_layers, detach=True) as tap:
                f, logits = teacher.forward_features(x)
                for a_l, t_l, layer in zip(acc, tail_prior.layers, bn_layers, strict=True):
                    _accumulate(a_l, tap[layer].float(), t_l.theta)
            p = logits.float().softmax(1)
            feats.append(f.float().cpu())
            conf.append(p.max(1).values.cpu())
            pred.append(p.argmax(1).cpu())
    finally:
        teacher.train(was)
    stats = []
    for a in acc:
        m = a.s1 / a.count
        stats.append((m.float(), (a.s2 / a.count - m * m).clamp_min(0).float()))
    per_layer = [
        float(bn_matching([s], BNPrior((layer,))))
        for s, layer in zip(stats, bn_prior.layers, strict=True)
    ]
    tails = TailMasses(
        source=tail_prior.source,
        levels=tuple(tail_prior.levels),
        measured=[(a.exceed / a.count).mean(1).tolist() for a in acc],
        prior=[t.p.double().mean(1).tolist() for t in tail_prior.layers],
    )
    all_feats, all_conf, all_pred = torch.cat(feats), torch.cat(conf), torch.cat(pred)
    y = labels.cpu().long()
    hit = all_pred == y
    per_class = []
    for c, name in enumerate(class_names):
        mask = y == c
        k = int(mask.sum())
        per_class.append(
            ClassQuality(
                name=name,
                count=k,
                agreement=100.0 * int(hit[mask].sum()) / k if k else math.nan,
                confidence=float(all_conf[mask].double().mean()) if k else math.nan,
                diversity=mean_pairwise_cosine_distance(all_feats[mask]) if k >= 2 else None,
            )
        )
    within = [c.diversity for c in per_class if c.diversity is not None]
    n = int(y.shape[0])
    return QualityReport(
        num_images=n,
        teacher_agreement=100.0 * int(hit.sum()) / n,  # as stars.evaluation.top1 counts
        teacher_confidence=float(all_conf.double().mean()),
        bn_loss=float(bn_matching(stats, bn_prior)),
        bn_loss_per_layer=per_layer,
        tail_masses=tails,
        diversity_overall=mean_pairwise_cosine_distance(all_feats) if n >= 2 else None,
        diversity_within_class=sum(within) / len(within) if within else None,
        per_class=per_class,
    )


def _accumulate(acc: _Accumulator, a: Tensor, theta: Tensor) -> None:
    """Add a chunk of one layer's input ``a [n, C, *]`` to the sums (thresholds ``theta
    [K, C]``)."""
    dims = (0, *range(2, a.ndim))
    acc.s1 += a.sum(dims, dtype=torch.float64)
    acc.s2 += a.double().square().sum(dims)
    for k in range(theta.shape[0]):
        above = a > theta[k].view(1, -1, *([1] * (a.ndim - 2)))
        acc.exceed[k] += above.sum(dims, dtype=torch.float64)
    acc.count += a.numel() // a.shape[1]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, spec)


def quality_tables(report: QualityReport) -> tuple[Table, Table]:
    """Two rich tables: per class (images, agreement, confidence, diversity), and the set's
    figures (agreement, confidence, BN loss, diversity, tail masses against the prior)."""
    classes = Table(title="synthetic set: per class")
    for col, justify in (
        ("class", "left"),
        ("images", "right"),
        ("agreement (%)", "right"),
        ("confidence", "right"),
        ("diversity", "right"),
    ):
        classes.add_column(col, justify=justify)  # type: ignore[arg-type]
    for c in report.per_class:
        classes.add_row(
            c.name,
            str(c.count),
            _fmt(c.agreement, ".1f"),
            _fmt(c.confidence, ".3f"),
            _fmt(c.diversity, ".3f"),
        )
    overall = Table(title="synthetic set: quality")
    overall.add_column("metric")
    overall.add_column("value", justify="right")
    overall.add_row("images", str(report.num_images))
    overall.add_row("teacher agreement with intended labels (%)", f"{report.teacher_agreement:.2f}")
    overall.add_row("teacher mean confidence", f"{report.teacher_confidence:.3f}")
    overall.add_row("BN loss (whole set)", f"{report.bn_loss:.3f}")
    overall.add_row(
        "diversity within class / overall",
        f"{_fmt(report.diversity_within_class, '.3f')} / {_fmt(report.diversity_overall, '.3f')}",
    )
    measured, prior = report.tail_masses.mean_over_layers()
    for level, m, p in zip(report.tail_masses.levels, measured, prior, strict=True):
        overall.add_row(
            f"tail mass at {report.tail_masses.source} level {level:g} (prior)",
            f"{m:.4f} ({p:.4f})",
        )
    return classes, overall
