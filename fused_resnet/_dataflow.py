"""Whether a module's own ``forward`` computes what a known ``forward`` computes on the same children.

``fuse`` recognises torchvision-structured blocks by their children (``conv1 bn1 relu conv2 bn2
[downsample]``...), so that a user's copy of torchvision's block is fused too. Children alone do not
say what the forward does with them: timm's DLA blocks have exactly those children but take the
shortcut as a second argument, and a user's variant may add elsewhere or not at all. So a block
whose forward is not a known one is fused only if its forward, traced with torch.fx (children as
leaves, in training and in eval: ``_traced_joins._trace``), has the same data flow as the known
forward traced on the same module: the same calls of the same children and functions on the same
operands, in any order (torchvision computes the downsample after the main branch, ``resnet_arch``
before it) and with ``a += b`` read as ``a + b`` (the in-place add of a block writes a tensor only
the block reads).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from . import _traced_joins

# Functions read as one: in-place and out-of-place adds, the forms of ReLU.
_SAME = {operator.iadd: operator.add, torch.add: operator.add, torch.relu_: torch.relu,
         torch.nn.functional.relu: torch.relu}


def _expression(node, memo: dict):
    """The data flow ending at ``node`` as a nested tuple (inputs by position, calls by target)."""
    if not isinstance(node, fx.Node):
        if isinstance(node, (tuple, list)):
            return tuple(_expression(v, memo) for v in node)
        return ("const", repr(node))
    if node in memo:
        return memo[node]
    if node.op == "placeholder":
        expr = ("input", node.target)
    elif node.op in ("call_module", "call_function", "call_method", "get_attr", "output"):
        target = _SAME.get(node.target, node.target) if node.op == "call_function" else node.target
        kwargs = tuple(sorted((k, _expression(v, memo)) for k, v in node.kwargs.items()))
        expr = (node.op, str(target), tuple(_expression(a, memo) for a in node.args), kwargs)
    else:
        expr = (node.op, str(node.target))
    memo[node] = expr
    return expr


def _flow(module: nn.Module):
    graph, _ = _traced_joins._trace(module)
    if graph is None:
        return None
    output = next(n for n in graph.nodes if n.op == "output")
    return len([n for n in graph.nodes if n.op == "placeholder"]), _expression(output, {})


def computes_as(module: nn.Module, known: type) -> bool:
    """Whether ``module``'s forward has the data flow of ``known.forward`` run on ``module``'s own
    children and attributes (``known``: an ``nn.Module`` class of the same structure)."""
    if type(module).forward is known.forward:
        return True
    stand_in = known.__new__(known)  # the known forward on this module's state (a shallow view)
    stand_in.__dict__.update(module.__dict__)
    own, expected = _flow(module), _flow(stand_in)
    return own is not None and own == expected
