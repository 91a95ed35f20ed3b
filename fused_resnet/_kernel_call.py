"""How the op layer runs a backend's Python kernel (``_library.py``'s ops and the extension's Python
kernel hook): the backend chosen for the call, autocast off inside (the op casts as its schema
says), and outputs that alias no input nor each other (the dispatcher relies on it)."""

from __future__ import annotations

import torch

from . import _backend


def run(kernel: str, device: torch.device, *args, backend: str | None = None, record_as: str | None = None):
    chosen, fn = _backend.select(kernel, device.type, args, backend)
    if record_as is not None:  # a kernel composed of this one (conv_bn of conv_stats) ran on that backend too
        _backend.record(record_as, chosen)
    if torch.is_autocast_enabled(device.type):
        with torch.autocast(device.type, enabled=False):
            outputs = fn(*args)
    else:  # entering an autocast context costs more than many kernels on small tensors
        outputs = fn(*args)
    return unaliased(outputs, args)


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def unaliased(outputs, args):
    """Op outputs may alias neither an input nor each other (the dispatcher relies on it); a kernel
    that returns, say, the incoming gradient unchanged, or a view of it, gets a copy made here.
    Identity checks only: this runs on every call."""
    if outputs is None:
        return None
    single = isinstance(outputs, torch.Tensor)
    roots = [_root(a) for a in args if isinstance(a, torch.Tensor)]
    fresh = []
    for out in (outputs,) if single else outputs:
        if out is not None:
            root = _root(out)
            if any(root is r for r in roots):
                out = out.clone()
                root = out
            roots.append(root)
        fresh.append(out)
    return fresh[0] if single else tuple(fresh)


def fill(outputs, likes):
    """Kernels return None for gradients not computed; the schema wants tensors: empty ones."""
    return tuple(o if o is not None else like.new_empty(0) for o, like in zip(outputs, likes))
