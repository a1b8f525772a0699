"""Calibration shared by the processes of a torch.distributed job (``torchrun --nproc-per-node N``).

Every statistic moefx collects is a sum over calibration tokens (counts, sums, Gram matrices), so ranks
can calibrate on disjoint shares of the batches and add their sums. Inside :func:`sharded`, each
:func:`moefx.calibrate` pass ends with an all-reduce of the observers' sums over the default process group:
every rank then holds the statistics of all batches and plans as one process would. A pass adds to what
earlier passes summed, so the ranks other than 0 start each pass from zero and rank 0 carries the total.

Rank 0 alone plans (:func:`computed_on_first`) and sends the plans, with the merged experts the second pass
needs, to the other ranks, which wait meanwhile; the layer-wise driver broadcasts rank 0's compressed layer
before the ranks propagate through it, so that all ranks go on from one set of weights. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from moefx.errors import CalibrationError
from moefx.passes.observe import ObservedExperts, RoutingObserver

T = TypeVar("T")
_SHARDED = contextvars.ContextVar("moefx_sharded_calibration", default=False)


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the world size (0 and 1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def sharded() -> Iterator[None]:
    """Within it, calibration passes sum their statistics across the ranks of the default process group
    (each rank calibrating on its own share of the batches); a no-op in a single process."""
    token = _SHARDED.set(rank_and_size()[1] > 1)
    try:
        yield
    finally:
        _SHARDED.reset(token)


def share(batches: list[T]) -> list[T]:
    """This rank's share of ``batches`` (every world-size-th batch from its rank on)."""
    rank, size = rank_and_size()
    if size > 1 and len(batches) < size:
        raise CalibrationError(
            f"{len(batches)} calibration batches cannot be shared by {size} processes: give at least one "
            "batch per process (more sequences, or a smaller batch size)"
        )
    return batches[rank::size]


def _statistics(model: nn.Module) -> list[torch.Tensor]:
    return [
        buffer
        for module in model.modules()
        if isinstance(module, (RoutingObserver, ObservedExperts))
        for buffer in module.buffers(recurse=False)
        if buffer.is_floating_point()
    ]


@contextlib.contextmanager
def summed_across_ranks(model: nn.Module) -> Iterator[None]:
    """One calibration pass over ``model``'s observers whose sums are added across ranks at its end
    (inside :func:`sharded`; otherwise a no-op)."""
    if not _SHARDED.get():
        yield
        return
    if dist.get_rank() != 0:  # rank 0 carries the earlier passes' totals; the others add only this pass
        for statistic in _statistics(model):
            statistic.zero_()
    yield
    for statistic in _statistics(model):
        dist.all_reduce(statistic)


def broadcast_from_first(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers of ``module`` (inside :func:`sharded`)."""
    if _SHARDED.get():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)


def computed_on_first(compute: Callable[[], T], held: Sequence[torch.Tensor] = ()) -> T:
    """``compute()``, run by rank 0 alone and sent to every rank (inside :func:`sharded`; otherwise it is
    just ``compute()``).

    The result is pickled without its tensors, which are broadcast as tensors; a tensor that is one of
    ``held`` (tensors that every rank holds, equal and in the same order, such as the experts of a layer
    all ranks loaded) is sent as its index instead. An exception in ``compute`` is raised on every rank.
    """
    if not _SHARDED.get():
        return compute()
    first = dist.get_rank() == 0
    header: list[Any] = [None]
    tensors: list[torch.Tensor] = []
    if first:
        try:
            result = compute()
            payload, tensors = _without_tensors(result, {id(t): i for i, t in enumerate(held)})
            header = [(payload, [(t.shape, t.dtype) for t in tensors])]
        except Exception as error:  # the other ranks wait for this broadcast: they must fail too
            dist.broadcast_object_list([error], 0)
            raise
    dist.broadcast_object_list(header, 0)
    if isinstance(header[0], Exception):
        raise header[0]
    payload, layouts = header[0]
    if not first:
        tensors = [torch.empty(shape, dtype=dtype) for shape, dtype in layouts]
    for tensor in tensors:
        dist.broadcast(tensor, 0)
    if first:
        return result

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, key: tuple[str, int]) -> torch.Tensor:
            return held[key[1]] if key[0] == "held" else tensors[key[1]]

    return Unpickler(io.BytesIO(payload)).load()


def _without_tensors(result: Any, held: dict[int, int]) -> tuple[bytes, list[torch.Tensor]]:
    """``result`` pickled with each tensor replaced by its index in ``held`` (by identity) or in the list of
    the other tensors, which is returned with it (each contiguous)."""
    sent: list[torch.Tensor] = []
    sent_index: dict[int, int] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> tuple[str, int] | None:
            if not isinstance(obj, torch.Tensor):
                return None
            if id(obj) in held:
                return ("held", held[id(obj)])
            if id(obj) not in sent_index:
                sent_index[id(obj)] = len(sent)
                sent.append(obj.detach().contiguous())
            return ("sent", sent_index[id(obj)])

    buffer = io.BytesIO()
    Pickler(buffer).dump(result)
    return buffer.getvalue(), sent
