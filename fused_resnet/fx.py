"""``torch.fx`` symbolic tracing of fused models: the fused modules are leaves.

A fused module chooses its path in Python on every call (train or eval, hooks, whether the model
still holds its parts where ``fuse`` found them) and checks its arguments, which symbolic tracing
cannot follow ("symbolically traced variables cannot be used as inputs to control flow"). Traced as
leaves (one ``call_module`` node each, as ``nn.Conv2d`` is), they keep making that choice when the
graph runs, so a traced fused model computes what the fused model does, in training and in eval::

    graph_module = fused_resnet.fx.symbolic_trace(model)            # torch.fx.symbolic_trace, fused leaves
    tracer = fused_resnet.fx.FusedTracer()                          # for tools that take a Tracer
    from torchvision.models.feature_extraction import create_feature_extractor
    features = create_feature_extractor(model, return_nodes={"layer2": "c3", "layer4": "c5"},
                                        tracer_kwargs={"leaf_modules": fused_resnet.fx.leaf_modules()})

Nodes inside a fused module (``layer2.0.bn1``) are not in such a graph: blocks, stages and the
modules around them are. For a graph of the plain modules, trace ``fused_resnet.unfuse(model)``.
"""

from __future__ import annotations

from torch import fx, nn

from . import _foreign, _traced_forward, dense, distributed, inference, modules

_FUSED = (inference.Preparable, modules.FusedAwayBatchNorm2d, modules.FusedAwayActivation, _foreign.FusedAwayNormAct,
          distributed.FusedAwaySyncBatchNorm2d, dense.FusedDenseBlock, dense.FusedDenseTransition)


def is_fused(module: nn.Module) -> bool:
    """Whether ``module`` is one of fused_resnet's fused modules (a fused block, a fused chain's conv,
    or the pass-through BN / ReLU of a chain), which tracers must treat as leaves."""
    return isinstance(module, _FUSED)


def leaf_modules() -> list[type]:
    """The fused module classes (bases: timm's fused blocks and norm-act layers are subclasses of
    them), for tracers that take leaf classes, e.g. torchvision's ``create_feature_extractor(...,
    tracer_kwargs={"leaf_modules": leaf_modules()})``."""
    return list(_FUSED)


class FusedTracer(fx.Tracer):
    """``torch.fx.Tracer`` that keeps fused modules as leaves (besides ``torch.nn``'s own)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_fused(m) or super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None):
        """A root whose own forward ``fuse`` replaced (adds in a user's forward, ``_traced_forward``) is
        traced through that own forward: the same values, its joins as the plain modules they call."""
        if not isinstance(root, _traced_forward.FusedTracedForward):
            return super().trace(root, concrete_args)
        fused_cls = type(root)
        root.__class__ = root.__dict__["class_before_fuse"]
        try:
            return super().trace(root, concrete_args)
        finally:
            root.__class__ = fused_cls


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)`` with the fused modules as leaves."""
    tracer = FusedTracer()
    graph = tracer.trace(model)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)


__all__ = ["FusedTracer", "is_fused", "leaf_modules", "symbolic_trace"]
