"""The rounding-error model the tests' tolerances are derived from.

``u`` is the unit roundoff: each float operation returns the exact result of its rounded
inputs times ``(1 + d)`` with ``|d| <= u`` (``2^-24`` in float32, ``2^-53`` in float64; ``eps``
in torch's ``finfo`` is ``2 u``). The worst-case bounds used (first order, Higham, *Accuracy and
Stability of Numerical Algorithms*, ch. 3-4), valid for any summation order (sequential,
pairwise or vectorized, which is why they hold for every kernel torch may pick):

- a sum of ``m`` terms is off by at most ``(m - 1) u sum |a_i|``; a mean of ``m`` terms of
  magnitude ``<= a`` by at most ``m u a`` (the division adds ``u``);
- a dot product of length ``d`` by at most ``d u sum |x_i y_i|``;
- the biased variance of ``m`` values of magnitude ``<= a`` by at most ``4 (m + 3) u a^2``
  (two passes: ``(x_i - mean)^2 <= 4 a^2`` each, then a mean);
- two computations of one quantity that are each within ``B`` of the exact value are within
  ``2 B`` of each other (a different reduction order, shape or kernel).

A test states which of these applies beside its tolerance and computes the tolerance from the
sizes and magnitudes of its own example, so that no example can fall outside it by rounding.
"""

from __future__ import annotations

import math

import torch

U32 = 2.0**-24
"""Unit roundoff of float32."""
U64 = 2.0**-53
"""Unit roundoff of float64."""

COMPUTE_DTYPES = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
]
"""(input dtype, the dtype the membrane replay and the firing maps compute in): float64
stays float64, every other floating dtype is computed in float32."""


def mean_error(m: int, a: float, u: float = U32) -> float:
    """Bound on the rounding error of a mean of ``m`` terms of magnitude ``<= a``."""
    return m * u * a


def variance_error(m: int, a: float, u: float = U32) -> float:
    """Bound on the rounding error of the biased variance of ``m`` values ``|x| <= a``."""
    return 4 * (m + 3) * u * a * a


def relation_error(d: int, u: float = U32) -> float:
    """Bound on the rounding error of an entry of ``relation_matrix`` for rows of width ``d``:
    the row norm (``d`` terms, then ``rsqrt``: ``(d + 2) u``), the scaling of both rows and the
    dot product of unit-bounded rows (``d u``): ``(2 d + 8) u``, entries being ``<= 1``."""
    return (2 * d + 8) * u


def kl_error(z_max: float, k: int, temperature: float, u: float = U32) -> float:
    """Bound on the rounding error of ``tau^2 KL(softmax(t / tau) || softmax(s / tau))`` per
    sample, ``z_max`` the largest ``|logit| / tau``: each log-probability is off by at most
    ``4 eps (z_max + log k + 1)`` (the max subtraction, the exp-sum and the log each round once
    per term), the KL weighs two of them by ``p`` (summing to 1), and ``tau^2`` scales it
    (``eps = 2 u``). A mean over samples keeps the bound."""
    return 16 * u * (z_max + math.log(k) + 1) * temperature**2


def rca_max(dt: int, ds: int, b: int) -> float:
    """float32 bound of ``rca_loss`` (exactly ``<= 4``): the entries of each R are within
    :func:`relation_error` of ``[-1, 1]``, so a squared difference is ``<= (2 + e_t + e_s)^2``,
    and the mean of ``b^2`` of them adds ``b^2 u``."""
    return (2 + relation_error(dt) + relation_error(ds)) ** 2 * (1 + b * b * U32)


def rca_reorder_tol(dt: int, ds: int, b: int, loss: float, shift: float = 0.0) -> float:
    """Two float32 computations of one ``rca_loss`` (permuted rows, a sub-batch, another
    kernel): each entry of each R is within :func:`relation_error` of the exact one on both
    sides, so entries are ``2 e`` apart (plus ``shift`` when the inputs themselves differ by
    rounding), a squared difference (``<= 4``) moves by ``<= 2 (2 + e) (2 e + shift)``, and the
    two means of ``b^2`` terms differ by ``<= 2 b^2 u loss``."""
    e = relation_error(dt) + relation_error(ds)
    return 2 * (2 + e) * (2 * e + shift) + 2 * b * b * U32 * abs(loss)
