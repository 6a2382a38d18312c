"""Data parallelism through ``accelerate``: the same code runs as one process or as many under
``accelerate launch`` / ``torchrun`` (DDP for training; sharded inputs for reconstruction and
evaluation, merged on the main process). CPU runs use the gloo backend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_ACCELERATORS: dict[str, Any] = {}


def get_accelerator(device: torch.device | str) -> Any:
    """The process's ``accelerate.Accelerator`` for a device type (made once, then reused)."""
    from accelerate import Accelerator

    kind = torch.device(device).type
    if kind not in _ACCELERATORS:
        _ACCELERATORS[kind] = Accelerator(cpu=kind == "cpu")
    return _ACCELERATORS[kind]


def process_state() -> Any:
    """accelerate's ``PartialState``: rank, world size and the process group (gloo without CUDA)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def shard(items: Sequence[T]) -> tuple[int, list[T]]:
    """This process's contiguous share of ``items`` and the index of its first item."""
    state = process_state()
    n, world, rank = len(items), state.num_processes, state.process_index
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    stop = start + per + (1 if rank < extra else 0)
    return start, list(items[start:stop])


def gather(values: list[T]) -> list[T]:
    """Every process's ``values`` concatenated in rank order (the same list on every process)."""
    state = process_state()
    if state.num_processes == 1:
        return list(values)
    from accelerate.utils import gather_object

    return list(gather_object(values))


def barrier() -> None:
    process_state().wait_for_everyone()


def is_main_process() -> bool:
    return process_state().is_main_process
