"""Activation memory kept for backward, counting what gradient checkpointing keeps too.

``timing.saved_activation_bytes`` counts what autograd saves through ``saved_tensors_hooks``. A
``torch.utils.checkpoint`` region (torchvision DenseNet's ``memory_efficient=True``) packs its saved
tensors with hooks of its own (the outer hooks never see them) and keeps its *inputs* alive for the
recomputation: those inputs are saved memory all the same, so they are counted here, by storage,
together with everything the hooks see.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint as cp


@contextlib.contextmanager
def _recording_checkpoint_inputs(kept: dict[int, int]):
    """While active, every ``torch.utils.checkpoint.checkpoint`` call records its tensor arguments'
    storages in ``kept`` (callers that look it up at call time, as ``cp.checkpoint(...)`` does)."""
    original = cp.checkpoint

    def recording(fn, *args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                kept[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()
        return original(fn, *args, **kwargs)

    cp.checkpoint = recording
    try:
        yield
    finally:
        cp.checkpoint = original


def saved_activation_bytes_with_checkpoints(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages kept for the backward of ``model(x)``: saved by autograd or
    kept as checkpoint inputs; the input and the parameters (which exist anyway) left out."""
    excluded = {t.untyped_storage().data_ptr() for t in (x, *model.parameters())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return t

    with _recording_checkpoint_inputs(kept), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(n for ptr, n in kept.items() if ptr not in excluded and ptr != 0)
