"""CMI: Contrastive Model Inversion (Fang et al., "Contrastive Model Inversion for Data-Free
Knowledge Transfer", IJCAI 2021; reference code github.com/zju-vipa/CMI,
``datafree/synthesis/contrastive.py``); its config is
:class:`stars.synthesis.methods.CMISynthesis`.

Each call re-initializes the generator (DCGAN-style :class:`ConvGenerator`, CMI's
``reset_model``: conv/linear weights ``N(0, 0.02)``, BN weights ``N(1, 0.02)``, biases 0),
draws a fresh latent ``z [N, nz]`` and sorted labels ``y``, and optimizes generator and ``z``
jointly (one Adam, lr ``lr_g``, betas 0.5/0.999) for ``iterations`` steps on

``L = l_bn L_bn + l_oh CE + l_adv L_adv + STARS  (the shared objective, on the global view)
      + l_cr L_cr``.

Two views of the generator's images ``x`` are drawn every step: the *global* view (a random
crop of ``x`` padded by 4 pixels, CMI's ``RandomCrop(padding=4)``, and a random horizontal
flip) and the *local* view (a random resized crop of scale ``(0.25, 1)`` and aspect ratio
``(3/4, 4/3)``, resized back to the image size, and a random flip), each drawn per sample.

**Contrastive term.** ``f(v) [N, D]`` is the concatenation, over the teacher's BN layers in
forward order, of each layer input's per-sample channel means over H and W (CMI's
``InstanceMeanHook`` on every BN layer). A projection head ``h`` (Linear D->D, ReLU,
Linear D->d, L2-normalized rows) maps them to the unit sphere. With ``M`` cached pairs
``(c_loc, c_glob)`` drawn without replacement from a bank of earlier batches' features (at
most ``n_negatives``), the anchors are ``a = h([f(local); c_loc])`` and the keys
``k = sg(h([f(global); c_glob]))`` (``sg``: stop-gradient), ``R = N + M`` rows each, and

``l_i = -log( exp(a_i . k_i / tau) / sum_{j<R} exp(a_i . k_j / tau) )``   (InfoNCE, ``tau =
cr_temperature``),

``L_cr = mean_{i<N} l_i + mean_{N<=i<R} l_i``  (the second mean only when ``M > 0``; CMI
splits the mean so that the current batch's gradient is not diluted by the cached rows).

Each row's positive is the same image's other view; its negatives are every other image of
the batch and of the bank, so the generator is pushed towards images the teacher can tell
apart from each other and from earlier batches. Since the rows are unit vectors,
``0 <= l_i <= log(1 + (R - 1) e^(2 / tau)) <= log R + 2 / tau``. The head is trained
jointly (its own Adam, lr ``lr_head``, default betas) and kept across calls; the generator
receives the contrastive gradient through the local view only (the keys are detached, as in
CMI). The lowest-loss step's images go to the image bank (:meth:`SynthesisContext.finish`)
and its ``(f(local), f(global))`` pairs to the feature bank (a ring buffer of
``feature_bank_size`` pairs).

Deviations from the paper / reference code:

- The student is spiking: the adversarial term ``L_adv`` of the shared objective compares the
  teacher's logits with the student's logits averaged over its T time steps; the student runs
  frozen (eval mode, no parameter gradients) so synthesis leaves it unchanged.
- The STARS plug-in (RCA, TAR, spike-aware TAR) is added by the shared objective; with its
  weights 0 the images are those of CMI without it, bit for bit.
- Augmentation: CMI uses kornia's batched augmentations. Here the crop boxes, offsets and
  flips are sampled by this module from the synthesizer's own generator ``ctx.rng``
  (torchvision's ``RandomResizedCrop`` / ``RandomCrop`` draw from torch's global generator
  and take none), following torchvision's ``RandomResizedCrop.get_params`` algorithm (10
  tries of area scale and log-ratio, else the whole image), vectorized over the batch; the
  crops are applied with ``torchvision.transforms.v2.functional.resized_crop`` (bilinear).
  The images are cropped in the normalized space; the global view's padding is the
  normalized value of black, i.e. pixel 0 as in CMI (which pads before normalizing).
- The latent ``z`` uses the generator's learning rate (as in CMI, which has no ``lr_z``).
- The generator's BN running statistics are reset too (CMI leaves them; the generator runs
  in train mode, so they never affect an image).
- Negatives are sampled once per step with ``torch.randperm`` on ``ctx.rng`` (CMI: Python's
  ``random.sample``); the feature bank is a plain ring buffer (CMI requires its size to be a
  multiple of the batch size). The features are taken at every BN layer (CMI's default;
  its ``feature_layers`` option is not offered).
- With ``cr_weight`` 0 the contrastive term is neither computed nor logged (no local view,
  no head step, no feature bank): the method is CMI's inversion loss alone, and saves a
  teacher forward per step.
- Pre-inverted initial data (CMI's ``--cmi_init``) is not supported: the bank starts empty.

The teacher and the student are left untouched; every random number comes from
``ctx.rng`` (the head's initial weights from ``ctx.seed``), so seeded runs repeat exactly, and
:meth:`CMISynthesizer.state_dict` holds the context (image bank, random state), the head,
its optimizer and the feature bank, so a resumed run continues identically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from stars.models.protocols import SpikingStudent
from stars.runtime import autocast
from stars.synthesis.objective import ObjectiveOutput
from stars.synthesis.priors import FeatureTap
from stars.synthesis.protocols import SynthesisStep
from stars.synthesis.synthesizers import (
    SynthesisContext,
    SynthesizerBase,
    maybe_frozen,
    seeded_generator,
    step_value,
)

__all__ = [
    "CMISynthesizer",
    "FeatureBank",
    "ProjectionHead",
    "cmi_contrastive_loss",
    "contrastive_rows",
    "global_view",
    "local_view",
    "sample_resized_crops",
]

LOCAL_SCALE = (0.25, 1.0)
"""CMI's local view: ``RandomResizedCrop(scale=[0.25, 1.0])``."""
RATIO = (3.0 / 4.0, 4.0 / 3.0)
"""The aspect-ratio range of the local crop (torchvision's and kornia's default)."""
GLOBAL_PADDING = 4
"""CMI's global view: ``RandomCrop(padding=4)``."""


# ----------------------------------------------------------------------------- the loss


def contrastive_rows(anchors: Tensor, keys: Tensor, *, temperature: float) -> Tensor:
    """Per-row InfoNCE: ``l_i = -log softmax_j(a_i . k_j / tau)[i]``.

    Args:
        anchors: ``[R, d]`` unit rows (the local views' projections).
        keys: ``[R, d]`` unit rows (the global views' projections; row ``i`` is anchor
            ``i``'s positive, every other row a negative).
        temperature: ``tau > 0``.

    Returns:
        ``[R]``; for unit rows ``0 <= l_i <= log(1 + (R - 1) exp(2 / tau))``.
    """
    if anchors.shape != keys.shape or anchors.dim() != 2:
        raise ValueError(f"anchors {tuple(anchors.shape)} and keys {tuple(keys.shape)}")
    logits = anchors @ keys.T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


def cmi_contrastive_loss(
    anchors: Tensor, keys: Tensor, *, temperature: float, n_current: int
) -> Tensor:
    """CMI's ``L_cr``: the mean InfoNCE of the current batch's ``n_current`` rows plus the
    mean of the cached rows after them (when there are any).

    Args:
        anchors, keys: ``[R, d]`` unit rows, the current batch first (see
            :func:`contrastive_rows`).
        temperature: ``tau > 0``.
        n_current: rows of the current batch, ``1 <= n_current <= R``.
    """
    if not 1 <= n_current <= anchors.shape[0]:
        raise ValueError(f"n_current {n_current} not in [1, {anchors.shape[0]}]")
    rows = contrastive_rows(anchors, keys, temperature=temperature)
    loss = rows[:n_current].mean()
    if rows.shape[0] > n_current:
        loss = loss + rows[n_current:].mean()
    return loss


class ProjectionHead(nn.Module):
    """CMI's ``MLPHead``: Linear ``D -> hidden``, ReLU, Linear ``hidden -> d``, then each row
    scaled to unit length."""

    def __init__(self, dim_in: int, dim_out: int, dim_hidden: int | None = None) -> None:
        super().__init__()
        hidden = dim_in if dim_hidden is None else dim_hidden
        self.net = nn.Sequential(
            nn.Linear(dim_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim_out)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1)


# ----------------------------------------------------------------------------- the views


def sample_resized_crops(
    n: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    tries: int = 10,
) -> Tensor:
    """``n`` crop boxes ``[n, 4]`` (top, left, h, w), int64, drawn as torchvision's
    ``RandomResizedCrop.get_params`` draws one: up to ``tries`` (area scale, log aspect
    ratio) pairs, the first whose box fits is kept, else the whole image clipped to
    ``ratio`` (centred); then a uniform position. A fixed number of random numbers is drawn
    whatever the outcome (``2 n tries + 2 n``), so the stream of ``generator`` does not
    depend on the data."""
    area = height * width
    u_area = torch.rand(n, tries, generator=generator, dtype=torch.float64)
    u_ratio = torch.rand(n, tries, generator=generator, dtype=torch.float64)
    u_pos = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first fitting try (0 if none)
    any_fit = fits.any(dim=1)
    # torchvision's fallback: the central crop of the whole image, clipped to ``ratio``.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    bw = torch.where(any_fit, w.gather(1, first).squeeze(1), torch.full((n,), fw))
    bh = torch.where(any_fit, h.gather(1, first).squeeze(1), torch.full((n,), fh))
    top = torch.floor(u_pos[:, 0] * (height - bh + 1).double()).long()
    left = torch.floor(u_pos[:, 1] * (width - bw + 1).double()).long()
    top = torch.where(any_fit, top.clamp(max=height - bh), (height - bh) // 2)
    left = torch.where(any_fit, left.clamp(max=width - bw), (width - bw) // 2)
    return torch.stack([top, left, bh, bw], dim=1)


def _flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """A horizontal flip of each sample with probability 1/2 (``n`` numbers drawn)."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def local_view(x: Tensor, *, generator: torch.Generator) -> Tensor:
    """CMI's local view of ``x [N, C, H, W]``: a random resized crop per sample (scale
    ``LOCAL_SCALE``, ratio ``RATIO``) back to ``H x W`` (bilinear), then a random flip.
    Differentiable in ``x``."""
    n, _, height, width = x.shape
    boxes = sample_resized_crops(
        n, height, width, scale=LOCAL_SCALE, ratio=RATIO, generator=generator
    ).tolist()
    crops = [
        TF.resized_crop(
            x[i : i + 1],
            top,
            left,
            h,
            w,
            [height, width],
            interpolation=InterpolationMode.BILINEAR,
            antialias=False,
        )
        for i, (top, left, h, w) in enumerate(boxes)
    ]
    return _flip(torch.cat(crops), generator)


def global_view(x: Tensor, *, black: Tensor, generator: torch.Generator) -> Tensor:
    """CMI's global view of ``x [N, C, H, W]``: padded by ``GLOBAL_PADDING`` pixels of
    ``black [C]`` (the normalized value of pixel 0) and cropped back to ``H x W`` at a random
    offset per sample, then a random flip. Differentiable in ``x``; every pixel is a copy
    of one of ``x`` or of ``black`` (no arithmetic)."""
    n, c, height, width = x.shape
    p = GLOBAL_PADDING
    offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=generator).tolist()
    padded = black.to(x).view(1, c, 1, 1).expand(n, c, height + 2 * p, width + 2 * p).clone()
    padded[:, :, p : p + height, p : p + width] = x
    crops = [padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)]
    return _flip(torch.stack(crops), generator)


# ----------------------------------------------------------------------------- the bank


class FeatureBank:
    """A ring buffer of feature rows ``[dim]`` (CMI's ``MemoryBank`` of ``(local, global)``
    instance-mean pairs) on ``device``, grown as rows arrive up to ``capacity``, then the
    oldest replaced first; :meth:`sample` draws without replacement."""

    def __init__(self, capacity: int, dim: int, device: torch.device) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity, self.dim, self.device = capacity, dim, device
        self._data = torch.zeros(0, dim, device=device)
        self._next = 0
        """Where the next row goes once the buffer is full."""

    def __len__(self) -> int:
        return int(self._data.shape[0])

    def add(self, rows: Tensor) -> None:
        """Append ``rows [n, dim]`` (detached, float32), dropping the oldest when full."""
        rows = rows.detach().to(self.device, torch.float32)
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows {tuple(rows.shape)}, expected [n, {self.dim}]")
        rows = rows[-self.capacity :]
        room = self.capacity - len(self)
        if room > 0:
            self._data = torch.cat([self._data, rows[:room]])
            rows = rows[room:]
        n = rows.shape[0]
        if n:
            idx = (torch.arange(n) + self._next) % self.capacity
            self._data[idx.to(self.device)] = rows
            self._next = (self._next + n) % self.capacity

    def rows(self) -> Tensor:
        """The stored rows, oldest first, ``[len, dim]``."""
        return torch.roll(self._data, -self._next, dims=0) if self._next else self._data

    def sample(self, k: int, *, generator: torch.Generator) -> Tensor:
        """``min(k, len)`` rows drawn uniformly without replacement ``[m, dim]`` (none, and
        no random number drawn, while the bank is empty)."""
        size = len(self)
        if size == 0 or k <= 0:
            return self._data[:0]
        idx = torch.randperm(size, generator=generator)[:k]
        return self._data[idx.to(self.device)]

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self._data.clone(), "next": self._next}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rows = state["rows"].to(self.device, torch.float32)
        if rows.dim() != 2 or rows.shape[1] != self.dim or rows.shape[0] > self.capacity:
            raise ValueError(
                f"feature bank rows {tuple(rows.shape)} do not fit [<={self.capacity}, {self.dim}]"
            )
        self._data = rows.clone()
        self._next = int(state["next"])


# ----------------------------------------------------------------------------- the method


def _instance_means(tap: FeatureTap, layers: Sequence[nn.Module]) -> Tensor:
    """``[N, D]``: each layer input's per-sample channel means over H, W, concatenated."""
    return torch.cat([tap[m].float().mean(dim=(2, 3)) for m in layers], dim=1)


def _reinit_generator(generator: nn.Module, rng: torch.Generator) -> None:
    """CMI's ``reset_model`` with numbers drawn from ``rng``: conv and linear weights
    ``N(0, 0.02)``, BN weights ``N(1, 0.02)``, biases 0; BN running statistics reset."""
    with torch.no_grad():
        for m in generator.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=rng) * 0.02)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                assert m.weight is not None and m.bias is not None
                m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=rng) * 0.02)
                m.bias.zero_()
                m.reset_running_stats()


class CMISynthesizer(SynthesizerBase):
    """CMI (Fang et al., IJCAI 2021): a generator re-initialized per batch, optimized with
    its latent for ``iterations`` steps on the inversion loss plus the contrastive term (see
    the module docstring for the formula and the deviations).

    Args:
        ctx: the shared context (teacher, objective, banks, random generator).
        nz: latent size.
        lr_g: Adam learning rate of the generator and of ``z`` (betas 0.5/0.999).
        iterations: optimization steps per batch (CMI's ``g_steps``).
        cr_weight: ``l_cr`` (0: no contrastive term).
        cr_temperature: ``tau`` of the InfoNCE.
        head_dim: the projection head's output size ``d``.
        feature_bank_size: ``(local, global)`` feature pairs kept for negatives.
        n_negatives: cached pairs drawn from the bank per step.
        lr_head: the head's Adam learning rate (None: ``lr_g``, as CMI).
    """

    def __init__(
        self,
        ctx: SynthesisContext,
        *,
        nz: int,
        lr_g: float,
        iterations: int,
        cr_weight: float,
        cr_temperature: float,
        head_dim: int,
        feature_bank_size: int,
        n_negatives: int,
        lr_head: float | None = None,
    ) -> None:
        self.ctx = ctx
        self.nz = nz
        self.lr_g = lr_g
        self.iterations = iterations
        self.cr_weight = cr_weight
        self.cr_temperature = cr_temperature
        self.n_negatives = n_negatives
        self.layers: list[nn.Module] = list(ctx.objective.bn_layers)
        self.feature_dim = sum(
            int(layer.running_mean.numel()) for layer in ctx.objective.bn_prior.layers
        )
        # The generator's weights are drawn again from ctx.rng on every call; the head's
        # initial weights, like the other methods' generators, under ctx.seed (the global
        # random state is left as it was).
        self.generator = seeded_generator(ctx, nz).to(ctx.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            self.head = ProjectionHead(self.feature_dim, head_dim).to(ctx.device)
        self.head_opt = torch.optim.Adam(
            self.head.parameters(), lr=lr_g if lr_head is None else lr_head
        )
        self.features = FeatureBank(feature_bank_size, 2 * self.feature_dim, ctx.device)
        mean = torch.tensor(ctx.mean, dtype=torch.float32)
        std = torch.tensor(ctx.std, dtype=torch.float32)
        self.black = ((0.0 - mean) / std).to(ctx.device)
        """The normalized value of a black pixel: the global view's padding."""

    def _contrastive(self, x: Tensor, g_feat: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_cr, f(local))`` for images ``x`` whose global view had features ``g_feat``."""
        ctx = self.ctx
        view = local_view(x, generator=ctx.rng)
        with FeatureTap(self.layers) as tap, autocast(view.device, ctx.objective.precision):
            ctx.teacher(view)
            l_feat = _instance_means(tap, self.layers)
        cached = self.features.sample(self.n_negatives, generator=ctx.rng)
        c_loc, c_glob = cached[:, : self.feature_dim], cached[:, self.feature_dim :]
        anchors = self.head(torch.cat([l_feat, c_loc]))
        with torch.no_grad():
            keys = self.head(torch.cat([g_feat.detach(), c_glob]))
        loss = cmi_contrastive_loss(
            anchors, keys, temperature=self.cr_temperature, n_current=x.shape[0]
        )
        return loss, l_feat

    def synthesize(self, student: SpikingStudent | None) -> SynthesisStep:
        ctx = self.ctx
        n = ctx.batch_size
        _reinit_generator(self.generator, ctx.rng)
        self.generator.train()
        z = ctx.randn(n, self.nz).requires_grad_(True)
        y = ctx.labels(n)
        groups: list[dict[str, Any]] = [
            {"params": list(self.generator.parameters())},
            {"params": [z]},
        ]
        opt = torch.optim.Adam(groups, lr=self.lr_g, betas=(0.5, 0.999))
        best: tuple[float, Tensor, Tensor | None] | None = None
        out: ObjectiveOutput | None = None
        trace: list[float] = []
        with maybe_frozen(student):
            for i in range(self.iterations):
                last = i == self.iterations - 1
                x = ctx.generate(self.generator, z)
                view = global_view(x, black=self.black, generator=ctx.rng)
                feats: Tensor | None = None
                if self.cr_weight > 0:
                    with FeatureTap(self.layers) as tap:
                        out = ctx.objective(view, y, student, measure=last)
                        g_feat = _instance_means(tap, self.layers).detach()
                    cr, l_feat = self._contrastive(x, g_feat)
                    out = ObjectiveOutput(
                        out.total + self.cr_weight * cr,
                        {**out.terms, "cr": cr},
                        out.t_logits,
                        out.stats,
                    )
                    feats = torch.cat([l_feat.detach(), g_feat], dim=1)
                else:
                    out = ctx.objective(view, y, student, measure=last)
                value = step_value(out.total)
                trace.append(value)
                if best is None or value < best[0]:
                    best = (value, x.detach().clone(), feats)
                opt.zero_grad(set_to_none=True)
                self.head_opt.zero_grad(set_to_none=True)
                torch.autograd.backward(out.total)
                opt.step()
                if feats is not None:
                    self.head_opt.step()
        assert best is not None and out is not None
        step = ctx.finish(best[1], y, out, trace)
        if best[2] is not None and step.finite and bool(torch.isfinite(best[2]).all()):
            self.features.add(best[2])
        return step

    def state_dict(self) -> dict[str, Any]:
        return {
            "ctx": self.ctx.state_dict(),
            "head": self.head.state_dict(),
            "head_opt": self.head_opt.state_dict(),
            "features": self.features.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ctx.load_state_dict(state["ctx"])
        self.head.load_state_dict(state["head"])
        self.head_opt.load_state_dict(state["head_opt"])
        self.features.load_state_dict(state["features"])
