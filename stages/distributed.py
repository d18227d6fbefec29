"""Several processes: which one this is and how they meet.

A command started by ``accelerate launch --num_processes N`` (GPUs, DDP / FSDP / DeepSpeed
through an accelerate config file) or ``torchrun --nproc_per_node N`` (CPU processes,
gloo) runs once per process. ``ranks`` is (this process, how many); one process alone
never touches ``torch.distributed``. ``accelerate.PartialState`` sets up the process
group from the launcher's environment, so every backend accelerate knows works here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def launched() -> bool:
    """Whether a launcher started several processes (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # without GPUs: gloo CPU processes (MULTI_CPU)


def ranks() -> tuple[int, int]:
    """(this process's index, the number of processes)."""
    if not launched():
        return 0, 1
    state = _state()
    return state.process_index, state.num_processes


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for alone)."""
    if launched():
        _state().wait_for_everyone()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (creating what the others then find)."""
    rank, _ = ranks()
    if rank != 0:
        barrier()
    yield
    if rank == 0:
        barrier()
