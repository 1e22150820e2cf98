"""Data parallelism for the trainer: what ranks exchange, and nothing else.

Each rank samples its contiguous share of an epoch's images (the noise of image i is seeded by its global
index, so the images do not depend on the number of processes), the rewards are gathered so that every rank
computes the same advantages, each rank back-propagates its own samples, and the LoRA gradients are summed
over ranks before every optimizer step. Every rank then takes the same step from the same state, so the LoRA
stays identical everywhere without broadcasting weights; rank 0 alone writes files.

The gradient is all-reduced explicitly rather than through a DistributedDataParallel wrapper: the trainer
runs the text encoder once per optimizer step and back-propagates the micro-batches through detached leaves
(training/update.py), a pattern DDP's once-per-forward hooks do not follow. An explicit reduce of the LoRA's
few parameters is exact, cheap, and tested against a single-process run.

Works under `torchrun` and `accelerate launch` (both set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT);
gloo on CPUs, NCCL on CUDA GPUs.
"""
from __future__ import annotations

import datetime
import logging
import os

import torch

log = logging.getLogger(__name__)


class SingleProcess:
    """The world of one: every exchange is the identity."""

    rank, world_size, local_rank = 0, 1, 0
    is_main = True

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        pass

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class ProcessGroup:
    """torch.distributed's default group. Tensors are exchanged on the backend's device (CPU for gloo)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.is_main = self.rank == 0
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0 (same shape on every rank), in rank order."""
        local = t.detach().to(self.comm_device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        self._dist.all_gather(parts, local)
        return torch.cat(parts).to(t.device)

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum in place over ranks, in one flat message."""
        if not tensors:
            return
        flat = torch.cat([x.detach().reshape(-1).to(self.comm_device, torch.float32) for x in tensors])
        self._dist.all_reduce(flat)
        offset = 0
        for x in tensors:
            n = x.numel()
            x.copy_(flat[offset:offset + n].view_as(x).to(x.device, x.dtype))
            offset += n

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(self.comm_device, torch.float32).clone()
        self._dist.all_reduce(out, op=self._dist.ReduceOp.MAX)
        return out.to(t.device)

    def barrier(self) -> None:
        self._dist.barrier()

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


Group = SingleProcess | ProcessGroup


def shard(group: Group, n: int) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of n samples (n is a multiple of the world size)."""
    per = n // group.world_size
    return group.rank * per, (group.rank + 1) * per


def sum_gradients(group: Group, params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its sum over ranks. A rank without a gradient for a parameter (it
    held none of the step's samples) contributes zeros; a parameter no rank has a gradient for keeps grad None,
    as on one process, so AdamW leaves it alone (no weight decay)."""
    if group.world_size == 1:
        return
    present = torch.tensor([float(p.grad is not None) for p in params])
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    group.all_reduce_sum([p.grad for p in params] + [present])
    for p, n in zip(params, present.tolist()):
        if n == 0:
            p.grad = None


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch; 1 when started as a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> SingleProcess | ProcessGroup:
    """Join the group torchrun / accelerate launch set up, or stay single-process.

    backend: "gloo" or "nccl"; by default NCCL when CUDA is available, else gloo. Each rank uses the GPU of
    its LOCAL_RANK. `timeout_s` bounds how long a rank waits in a collective for a peer that died, so a
    failure ends the run instead of hanging it.
    """
    import torch.distributed as dist

    if launched_world_size() <= 1:
        return SingleProcess()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    group = ProcessGroup()
    log.info("rank %d of %d (%s)", group.rank, group.world_size, dist.get_backend())
    return group


def device_for(group: SingleProcess | ProcessGroup, requested: str | None = None) -> torch.device:
    """The device this rank computes on: the requested one, else its own GPU, else the CPU."""
    if requested and requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
            dev = torch.device("cuda", group.local_rank)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", group.local_rank % torch.cuda.device_count())
    return torch.device("cpu")
