"""Data parallelism through torch.distributed, set up by accelerate (never a home-made transport).

Launch with ``accelerate launch --multi_gpu --num_processes N -m cptune train ...`` (on a CPU-only
machine accelerate still starts N processes through torchrun; cptune then asks accelerate for the
gloo backend) or ``torchrun --nproc_per_node N -m cptune train ...``. Each process takes every N-th
row of the global batch; the delta gradient is summed across processes with ``all_reduce``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_group() -> tuple[int, int]:
    """``(rank, world_size)``; initialises the process group through accelerate when launched with N > 1."""
    if not _launched_distributed():
        return 0, 1
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that writes files and prints."""
    return process_group()[0] == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place across processes (no-op in a single process); returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
