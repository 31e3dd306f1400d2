"""Multi-process calibration on torch.distributed (`torchrun --nproc-per-node N -m flatquant quantize ...`).

The process group comes from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): NCCL when each rank
has a GPU, gloo on the CPU. Ranks exchange only small Python objects (which layer, its loss, its file's
checksum, or the error that stopped it); parameters go through the shared output folder.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from flatquant.errors import FlatQuantError

TIMEOUT = datetime.timedelta(hours=6)  # rank 0's sequential passes (full precision, GPTQ) keep others waiting


class RankFailed(FlatQuantError):
    """Another rank (or this one) failed: the job stops; finished layers stay saved for a rerun."""


@dataclass
class Dist:
    """This process's place in the job: world size 1 means no process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (one item when alone)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def check(self, error: str | None, what: str) -> None:
        """Stop every rank with one message when any rank reports an error (None = this rank is fine)."""
        errors = [(r, e) for r, e in enumerate(self.gather(error)) if e]
        if errors:
            r, e = errors[0]
            more = f" (and {len(errors) - 1} other rank(s))" if len(errors) > 1 else ""
            raise RankFailed(f"rank {r} failed during {what}: {e}{more}")


def world_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def setup(device: str | None) -> tuple[Dist, str]:
    """Join torchrun's process group when WORLD_SIZE > 1. Returns (Dist, this rank's device)."""
    world = world_from_env()
    if world <= 1:
        return Dist(), device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        if torch.cuda.device_count() <= local:
            raise FlatQuantError(f"rank {rank}: local rank {local} has no GPU ({torch.cuda.device_count()} "
                                 "visible); use fewer processes or --device cpu")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                                             **({"device_id": torch.device(device)} if cuda else {}))
    return Dist(rank=rank, world=world, local_rank=local), device


def teardown(dist: Dist) -> None:
    if dist.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def assign(todo: list[int], world: int) -> list[list[int]]:
    """Rounds of layers: round k trains todo[k*world + r] on rank r. Depends only on the layers left, so a
    rerun with another number of processes resumes the same work."""
    return [todo[k:k + world] for k in range(0, len(todo), world)]
