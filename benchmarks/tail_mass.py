"""How heavy are the activation tails of the images a run synthesized, against real images?

For each paper_table run directory of a group, the memory bank in its ``checkpoint.safetensors``
(every image the run synthesized, as uint8) goes through the teacher, and at every teacher BN
layer's input the fraction of activations above ``running_mean + kappa * std`` is measured
(the hard tail mass TAR's soft exceedance stands in for), as a mean over channels and layers.
The same is measured on real images: the fixed val subset of the training split (the one
``--split val`` evaluates on), never the test split. Next to it, the TAR loss those images
would have under each threshold source (``gaussian-bn``, ``laplace-bn``; the run's kappas and
``tau_rel``), as a mean over batches of the run's synthesis batch size.

    python benchmarks/tail_mass.py runs/paper_table/test/fast-7acaf557eae2 \
        --out benchmarks/results/paper_table/tail_mass_fast-7acaf557eae2.md

It answers whether TAR's Gaussian targets ask for thinner tails than real images have (its
analysis is in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from stars.config import RunConfig, load_config
from stars.data.datasets import DataSource, build_data, first_n, stratified_subset
from stars.distill.checkpoint import load_state
from stars.models.factory import build_teacher
from stars.models.teachers import ANNTeacher
from stars.pipeline import VAL_SEED
from stars.synthesis.losses import bn_matching, tar_loss
from stars.synthesis.memory import MemoryBank
from stars.synthesis.priors import BNPrior, FeatureTap, extract_bn_prior, extract_tail_prior

KAPPAS = (1.0, 2.0, 3.0)
SOURCES = ("gaussian-bn", "laplace-bn")


@dataclasses.dataclass
class TailStats:
    """Hard tail fractions per kappa (mean over channels, then layers) and TAR losses."""

    images: int
    tail: dict[float, float]
    tail_last: dict[float, float]
    spread: float
    bn: float
    tar: dict[str, float]


def _batches(images: Tensor, size: int) -> Iterator[Tensor]:
    for i in range(0, len(images), size):
        yield images[i : i + size]


@torch.no_grad()
def measure(
    teacher: ANNTeacher, images: Tensor, cfg: RunConfig, batch: int, kappas: tuple[float, ...]
) -> TailStats:
    """Tail fractions and TAR losses of normalized ``images [N, 3, H, W]`` at ``teacher``."""
    bn: BNPrior = extract_bn_prior(teacher)
    priors = {
        s: extract_tail_prior(bn, cfg.stars.tar.model_copy(update={"source": s})) for s in SOURCES
    }
    counts = [torch.zeros(len(kappas), layer.num_channels) for layer in bn.layers]
    totals = [0] * len(bn.layers)
    tar = dict.fromkeys(SOURCES, 0.0)
    bn_loss = 0.0
    n_batches = 0
    for x in _batches(images, batch):
        with FeatureTap(teacher.bn_layers(), detach=True) as tap:
            teacher(x)
            feats = list(tap.values())
        for i, (h, layer) in enumerate(zip(feats, bn.layers, strict=True)):
            c = h.shape[1]
            for k, kappa in enumerate(kappas):
                theta = (layer.running_mean + kappa * layer.std).view(1, c, 1, 1)
                counts[i][k] += (h > theta).sum(dim=(0, 2, 3)).float()
            totals[i] += h.numel() // c
        bn_loss += float(bn_matching(feats, bn))
        for s in SOURCES:
            tar[s] += float(tar_loss(feats, priors[s]))
        n_batches += 1
    frac = [cnt / tot for cnt, tot in zip(counts, totals, strict=True)]  # [K, C] per layer
    tail = {k: float(torch.stack([f[i].mean() for f in frac]).mean()) for i, k in enumerate(kappas)}
    last = {k: float(frac[-1][i].mean()) for i, k in enumerate(kappas)}
    spread = float(torch.stack([f[0].std() for f in frac]).mean())
    tar = {s: v / n_batches for s, v in tar.items()}
    return TailStats(len(images), tail, last, spread, bn_loss / n_batches, tar)


def bank_images(run_dir: Path, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The run's memory bank (``checkpoint.safetensors``), normalized by ``mean`` / ``std``
    as :class:`~stars.synthesis.memory.MemoryBank` does."""
    state = load_state(run_dir / "checkpoint.safetensors")
    pixels: Tensor = state["synthesizer"]["ctx"]["bank"]["pixels"]
    return MemoryBank(1, mean, std).to_normalized(pixels)


def val_images(source: DataSource, val_size: int, n: int | None) -> Tensor:
    """The fixed val subset of the training split (stars.pipeline's), the first ``n``."""
    val = stratified_subset(source.train(augment=False), val_size, VAL_SEED)
    xs: list[Tensor] = []
    for x, _ in DataLoader(first_n(val, n), batch_size=500):
        xs.append(x)
    return torch.cat(xs)


def table(rows: list[tuple[str, TailStats]], kappas: tuple[float, ...]) -> str:
    head = (
        ["images", "n"]
        + [f"tail > {k:g} std" for k in kappas]
        + [f"last layer > {k:g} std" for k in kappas]
        + [f"channel spread > {kappas[0]:g} std", "BN loss"]
        + [f"TAR loss ({s})" for s in SOURCES]
    )
    out = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, st in rows:
        cells = [name, str(st.images)]
        cells += [f"{st.tail[k]:.4f}" for k in kappas]
        cells += [f"{st.tail_last[k]:.4f}" for k in kappas]
        cells += [f"{st.spread:.4f}", f"{st.bn:.2f}"]
        cells += [f"{st.tar[s]:.3f}" for s in SOURCES]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("group", type=Path, help="a paper_table group: runs/paper_table/<split>/<..>")
    p.add_argument("--real-images", type=int, default=5000, help="val images to measure")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = sorted(d for d in args.group.iterdir() if (d / "checkpoint.safetensors").is_file())
    if not runs:
        p.error(f"no run directory with a checkpoint.safetensors under {args.group}")
    cfg = load_config(runs[0] / "config.yaml")
    source = build_data(cfg.data)
    teacher = build_teacher(cfg.teacher, num_classes=source.num_classes, dataset=cfg.data.kind)
    batch = cfg.synthesis.batch_size
    real = val_images(source, cfg.evaluation.val_size, args.real_images)
    rows = [
        (
            "real (val subset)",
            measure(teacher, real, cfg, batch, KAPPAS),
        )
    ]
    for d in runs:
        rows.append(
            (
                d.name,
                measure(teacher, bank_images(d, source.mean, source.std), cfg, batch, KAPPAS),
            )
        )
        print(d.name, flush=True)
    text = (
        f"# Activation tails at the teacher's BN inputs: `{args.group}`\n\n"
        "Fraction of activations above `running_mean + kappa * std`, mean over channels and "
        "layers (and for the last BN layer alone); channel spread: the standard deviation of "
        "that fraction over a layer's channels, mean over layers; for comparison the "
        "Gaussian tail is 0.1587 / 0.0228 / 0.0013 and the Laplace one "
        "0.1216 / 0.0296 / 0.0072 for kappa 1 / 2 / 3."
        f" BN and TAR losses: mean over batches of {batch} "
        "(raw batch statistics, no momentum; TAR's kappas "
        f"{list(cfg.stars.tar.kappas)}, tau_rel {cfg.stars.tar.tau_rel}), before its weight. "
        "Synthetic rows: every image in the run's memory bank.\n\n"
        f"`python benchmarks/tail_mass.py {args.group}`\n\n" + table(rows, KAPPAS) + "\n"
    )
    if args.out is not None:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
