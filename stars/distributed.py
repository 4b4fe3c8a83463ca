"""Data-parallel distillation on torch.distributed, launched with ``torchrun``.

``torchrun --nproc-per-node N -m stars.cli distill CONFIG`` runs N processes. Each rank
synthesizes its share (``batch_size / N``) of every synthetic batch with its own generator
and random stream; the shares are all-gathered so that every rank's memory bank holds the
same images. The student trains under :class:`~torch.nn.parallel.DistributedDataParallel`:
each rank draws ``batch_size / N`` images from the bank with its own stream, DDP averages
the gradients, and BN buffers are broadcast from rank 0 at the end of every epoch, so all
ranks keep identical weights. Only rank 0 logs, evaluates and writes files. Without
``WORLD_SIZE`` > 1 in the environment nothing here is used and the run is single-process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from stars.models.protocols import Network, SpikingStudent

__all__ = [
    "DistInfo",
    "FeaturesForward",
    "broadcast_object",
    "ddp_features",
    "gather_batches",
    "gather_objects",
    "init_distributed",
    "max_rank_difference",
    "sync_buffers",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local)


def gather_batches(
    images: Tensor, labels: Tensor, finite: bool, info: DistInfo
) -> list[tuple[Tensor, Tensor] | None]:
    """Every rank's ``(images [n, C, H, W], labels [n])`` share in rank order, ``None`` for a
    share that was not finite. All ranks get the same list."""
    flag = torch.tensor([1.0 if finite else 0.0], device=images.device)
    imgs = [torch.empty_like(images) for _ in range(info.world)]
    labs = [torch.empty_like(labels) for _ in range(info.world)]
    flags = [torch.empty_like(flag) for _ in range(info.world)]
    dist.all_gather(imgs, images.contiguous())
    dist.all_gather(labs, labels.contiguous())
    dist.all_gather(flags, flag)
    return [(i, lab) if float(f) > 0 else None for i, lab, f in zip(imgs, labs, flags, strict=True)]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` from every rank, in rank order (torch.distributed's object collective)."""
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_rank_difference(model: Network, info: DistInfo) -> float:
    """Largest absolute difference of any weight or buffer between rank 0 and another rank."""
    vec = torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])
    vecs = [torch.empty_like(vec) for _ in range(info.world)]
    dist.all_gather(vecs, vec)
    return max(float((v - vecs[0]).abs().max()) for v in vecs)


def sync_buffers(model: Network, info: DistInfo) -> None:
    """Broadcast every buffer (BN running statistics) from rank 0."""
    if not info.enabled:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


class FeaturesForward(nn.Module):
    """``forward(x) = student.forward_features(x)``, so that DDP (which hooks ``forward``)
    can wrap the method the distiller calls."""

    def __init__(self, student: SpikingStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.student.forward_features(x)


def ddp_features(
    student: SpikingStudent, info: DistInfo, device: torch.device
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """The student's ``forward_features`` under DDP (gradients averaged over ranks)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    wrapped: Callable[[Tensor], tuple[Tensor, Tensor]] = DDP(
        FeaturesForward(student), device_ids=ids, broadcast_buffers=False
    )
    return wrapped
