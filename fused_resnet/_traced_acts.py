"""The activation after a traced add or chain (``_traced_joins``): which fx node applies it, and its
``_activation`` code, in the forms a user's forward writes it.

``F.relu`` / ``torch.relu`` / ``.relu()`` / ``.relu_()``, ``F.relu6``, ``F.hardtanh(x, 0, 6)``,
``F.silu``, ``F.hardswish``, ``F.leaky_relu`` with slope 0.01 or 0.1, in place or not, or a child
module ``_activation.module_code`` knows (``nn.ReLU``, ``nn.ReLU6``, ``nn.SiLU``, ...). Anything else
(another slope or bounds, a parameter computed in the forward) is no fusable activation: the add is
fused without it and the activation runs as written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import _activation
from .modules import has_hooks

# Functional activations: the code for their function and arguments (input first, then the
# function's own parameters, positional or by keyword; ``inplace`` allowed), None where the kernels
# do not apply that function (a LeakyReLU of another slope, a Hardtanh of other bounds).
_RELUS = (torch.relu, torch.relu_, F.relu, F.relu_)
_FUNCTIONAL_ACTS = {F.relu6: _activation.RELU6, F.silu: _activation.SILU, F.hardswish: _activation.HARDSWISH}
_METHOD_ACTS = {"relu": _activation.RELU, "relu_": _activation.RELU}


def _functional_code(fn, args: tuple, kwargs: dict) -> int | None:
    if fn in _RELUS or fn in _FUNCTIONAL_ACTS:
        if len(args) > 2 or set(kwargs) - {"inplace"}:
            return None
        return _activation.RELU if fn in _RELUS else _FUNCTIONAL_ACTS[fn]
    if fn is F.leaky_relu or fn is F.hardtanh:
        names = ("negative_slope", "inplace") if fn is F.leaky_relu else ("min_val", "max_val", "inplace")
        defaults = (0.01, False) if fn is F.leaky_relu else (-1.0, 1.0, False)
        if len(args) - 1 > len(names) or set(kwargs) - set(names):
            return None
        given = dict(zip(names, args[1:]), **kwargs)
        values = [given.get(n, d) for n, d in zip(names, defaults)]
        if not all(isinstance(v, (bool, int, float)) for v in values):
            return None  # a parameter computed in the forward: not a constant of the trace
        if fn is F.hardtanh:
            return _activation.RELU6 if (values[0], values[1]) == (0, 6) else None
        return next((c for c, slope in _activation.SLOPES.items() if values[0] == slope), None)
    return None


def act_after(node: fx.Node, root: nn.Module) -> tuple[fx.Node, nn.Module | None, int] | None:
    """The activation that alone reads ``node``: (its node, its module if it is one, its ``_activation``
    code), or None (none, or one the kernels do not apply)."""
    if len(node.users) != 1:
        return None
    r = next(iter(node.users))
    if not r.args or r.args[0] is not node:
        return None
    if r.op == "call_function":
        code = _functional_code(r.target, r.args, r.kwargs)
        return None if code is None else (r, None, code)
    if r.op == "call_method" and r.target in _METHOD_ACTS and len(r.args) == 1 and not r.kwargs:
        return r, None, _METHOD_ACTS[r.target]
    if r.op == "call_module" and len(r.args) == 1 and not r.kwargs:
        mod = root.get_submodule(r.target)
        code = _activation.module_code(mod)
        if code is not None and not has_hooks(mod):
            return r, mod, code
    return None
