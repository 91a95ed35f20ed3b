"""A user's own ``forward`` with its residual adds fused: the fused side of ``_traced_joins``.

``_traced_joins`` traces the forward of one module (its submodules as leaves) with torch.fx and
finds ``act?(a + b)`` where ``a`` is the output of a child chain ending in conv -> BN; this module
holds what it found (a :class:`Plan`: the traced graph as a list of steps, the add's nodes replaced
by one *join* step) and runs it. A join step is ``_joins.join_forward``: in training the main
branch's last BN, the shortcut's BN (when the shortcut is a conv -> BN), the add and the ReLU are
one ``bn_add_relu`` pass on the deferred BNs (``conv_bn`` -> ``(y, scale, shift)``); in eval both
BNs are folded and the add and ReLU run in the conv's epilogue (prepared convs when prepared).
A conv -> BN (-> ReLU) chain written out in the forward whose only reader is a plain conv (the
``conv1 -> bn2 -> relu -> conv2`` link of a hand-written pre-activation block) stays deferred in
training: that conv applies the BN and ReLU in its prologue (a ``conv_in`` step, ``ops.conv``), so
the chain's output is never written; in eval the chain is folded and the conv runs as it is.

Only this instance changes: its class becomes ``_foreign.subclass(FusedTracedForward, its class)``
(other instances of the user's class keep their own forward). The plan holds the traced modules by
reference and is only valid while the module looks as it did when traced, so every call checks
(:meth:`FusedTracedForward.fusable`) that the containers on the traced paths hold the same
children (``if self.downsample is not None`` was specialised on them), that the module's plain
attributes (``bool``/``int``/``float``/``str``/``None``) are unchanged, that the join's modules are
still plain, fusable and hook-free; if not, or when called with other arguments than traced (keywords,
a None where the trace had a value), the module runs its own forward. A call that leaves trailing
arguments to their plain defaults (or passes None for those that default to None) runs the plan
traced with those defaults (``Plan.variants``: timm's DLA trees call a block with one or two of its
three arguments).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import _symbolic_trace

from . import _activation, _foreign, _joins, _preact, distributed, inference, ops
from .modules import (
    _uses_batch_stats,
    conv_bn,
    eval_conv,
    has_hooks,
    is_fusable_conv,
    slots_intact,
    warn_if_global_hooks,
)

_PLAIN = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Ref:
    """A value of the plan: the result of step ``index`` (the forward's inputs come first)."""

    index: int


@dataclass
class TracedJoin:
    """``act(bn(conv(h)) + shortcut)``: ``main``/``short`` are the (conv, BN) slots; ``main_seq`` /
    ``short_seq`` the Sequential whose last two children they are (its other children run first, on
    the branch's input), or None when the forward calls the conv and the BN itself."""

    main: tuple  # ((owner, conv name, conv), (owner, BN name, BN))
    main_seq: nn.Module | None
    short: tuple | None  # the same for a conv -> BN shortcut; None: any tensor (the module's input...)
    short_seq: nn.Module | None
    act: int  # the activation after the add (an ``_activation`` code; NONE: none)
    act_module: nn.Module | None  # the activation child applied after the add (checked on every call)
    add: bool = True  # False: a conv -> BN (-> activation) chain written out in the forward, no add
    # A chain's only reader, a plain conv (owner, name, conv): in training it applies the chain's BN (and
    # activation) in its prologue (a "conv_in" step), so the chain's output is never written (pre-activation).
    consumer: tuple | None = None

    def __post_init__(self):
        # Tuples made once: the checks run on every call (host time).
        main = (self.main[0][2], self.main[1][2])
        self.pairs = tuple(([(self.short[0][2], self.short[1][2])] if self.short else []) + [main])
        self.slots = tuple(self.main) + tuple(self.short or ()) + ((self.consumer,) if self.consumer else ())
        self.covered = tuple(s[2] for s in self.slots) + tuple(
            m for m in (self.main_seq, self.short_seq, self.act_module) if m is not None)

    # pairs: (conv, BN) in the order join_forward folds them (shortcut first); slots: where the model
    # holds them; covered: the modules the fused join does not call (a hook on one: own forward).


@dataclass
class Plan:
    """A traced forward: ``inputs`` positional inputs, then ``steps`` (``(kind, ...)`` tuples; see
    :func:`run`), and what each call checks before running it (see the module docstring)."""

    inputs: int
    steps: list
    joins: list[TracedJoin]
    owners: list  # (container, names, children) of every container on a traced path
    attrs: list  # (name, value) of the traced module's plain attributes
    notes: dict = field(default_factory=dict)  # id(BN) -> why the trace found it not fusable (fusion_report)
    # Plans of the forward called with fewer positional arguments, by that count (``_traced_joins.
    # _shorter_calls``); a shorter call's ``pad``: the defaults of the arguments it leaves out.
    variants: dict = field(default_factory=dict)
    pad: tuple = ()

    def __post_init__(self):
        self.pairs = [p for j in self.joins for p in j.pairs]  # eval_pairs, when fusable
        self.offsets, offset = [], 0  # where each join's prepared convs start in them
        for join in self.joins:
            self.offsets.append(offset)
            offset += len(join.pairs)


def _load(a, env):
    if isinstance(a, Ref):
        return env[a.index]
    if isinstance(a, tuple):
        return tuple(_load(v, env) for v in a)
    if isinstance(a, list):
        return [_load(v, env) for v in a]
    if isinstance(a, dict):
        return {k: _load(v, env) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_load(a.start, env), _load(a.stop, env), _load(a.step, env))
    return a


def _conv_out(h: torch.Tensor, conv: nn.Conv2d) -> tuple[int, ...]:
    size = [h.shape[0], conv.out_channels]
    for i in range(2):
        k, s, p, d = conv.kernel_size[i], conv.stride[i], conv.padding[i], conv.dilation[i]
        size.append((h.shape[2 + i] + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(size)


def _join(join: TracedJoin, h, short, prepared):
    conv, bn = join.main[0][2], join.main[1][2]
    act = join.act
    if not join.add:  # as FusedConvBN2d does
        if not _uses_batch_stats(bn):
            return eval_conv(h, conv, bn, None, act, prepared[0] if prepared else None)
        if join.consumer is not None:  # left deferred: the consumer's "conv_in" step applies it
            return conv_bn(h, conv, bn)
        return ops.bn_add_relu(conv_bn(h, conv, bn), activation=act)
    pair = (join.short[0][2], join.short[1][2]) if join.short else None
    if not isinstance(h, torch.Tensor) or h.dim() != 4 or pair is None and not (
            isinstance(short, torch.Tensor) and short.dtype == h.dtype and tuple(short.shape) == _conv_out(h, conv)):
        # A residual the one-pass join cannot take as it is (broadcast, another dtype): the add as written.
        out = bn(conv(h)) + (short if pair is None else pair[1](pair[0](short)))
        return _activation.apply(out, act)
    return _joins.join_forward(short, h, (conv, bn), pair, act, prepared)


def run(module: nn.Module, plan: Plan, args, prepared) -> object:
    """Run ``plan`` on ``args``: each step's value appended to ``env``; returns the output's value."""
    env = list(args)
    joins, offsets = plan.joins, plan.offsets
    for step in plan.steps:
        kind = step[0]
        if kind == "call_module" or kind == "call_function":  # step[1]: the module, or the function
            value = step[1](*_load(step[2], env), **_load(step[3], env))
        elif kind == "call_method":
            this, *rest = _load(step[2], env)
            value = getattr(this, step[1])(*rest, **_load(step[3], env))
        elif kind == "get_attr":
            value = module
            for part in step[1].split("."):
                value = getattr(value, part)
        elif kind == "prefix":  # a branch Sequential's children before its conv and BN, as it holds them now
            value = env[step[2].index]
            children = list(step[1]._modules.values())
            for child in children[:-2]:
                value = child(value)
        elif kind == "conv_in":  # a conv reading a chain's output: its BN (deferred) in the prologue
            h, conv = env[step[2].index], step[1]
            value = conv(h) if not isinstance(h, ops.DeferredBN) else _preact.conv_without_bn(h, conv, step[3])
        elif kind == "join":
            join, start = joins[step[1]], offsets[step[1]]
            value = _join(join, env[step[2].index], env[step[3].index] if step[3] else None,
                          prepared[start:start + len(join.pairs)] if prepared else None)
        else:  # output
            return _load(step[1], env)
        env.append(value)
    raise RuntimeError("fused_resnet: a traced plan without an output")


def _fx_tracing() -> bool:
    """Whether torch.fx symbolic tracing (not dynamo) is running."""
    check = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None)
    if check is not None:
        return check()
    return bool(getattr(_symbolic_trace, "_is_fx_tracing_flag", False)) and not torch.compiler.is_compiling()


def _owners_intact(owners) -> bool:
    for owner, names, children in owners:
        mods = owner._modules
        if len(mods) != len(names):
            return False
        for name, child in zip(names, children):
            if mods.get(name, False) is not child:
                return False
    return True


def _join_intact(join: TracedJoin) -> bool:
    if not slots_intact(join.slots):
        return False
    for m in join.covered:
        if has_hooks(m):
            return False
    # An activation child's parameters (a LeakyReLU's slope, a Hardtanh's bounds) set since the trace:
    # the join would apply the old function.
    if join.act_module is not None and _activation.module_code(join.act_module) != join.act:
        return False
    for seq, slots in ((join.main_seq, join.main), (join.short_seq, join.short)):
        if seq is not None and list(seq._modules)[-2:] != [slots[0][1], slots[1][1]]:
            return False
    for c, b in join.pairs:
        if not (is_fusable_conv(c, bias=True) and _joins._plain_norm(b, c.out_channels)):
            return False
    return join.consumer is None or is_fusable_conv(join.consumer[2])


@_foreign.register_mixin
class FusedTracedForward(inference.Preparable):
    """Mixed into one module whose own forward ``_traced_joins`` traced (see the module docstring):
    runs the traced plan with its residual adds fused; its own forward when the plan does not apply."""

    traced_plan: Plan

    def fusable(self, plan: Plan | None = None) -> bool:
        """Whether the plan (default: the one of a call with every argument) still describes this module's
        forward and its joins can run fused (every call)."""
        plan = plan or self.__dict__["traced_plan"]
        d = self.__dict__
        for name, value in plan.attrs:
            now = d.get(name, _PLAIN)
            if now is not value and now != value:
                return False
        if not _owners_intact(plan.owners):
            return False
        for join in plan.joins:
            if not _join_intact(join):
                return False
        return True

    def eval_pairs(self):
        return list(self.traced_plan.pairs) if self.fusable() else []

    def forward(self, *args, **kwargs):
        if _fx_tracing():
            raise RuntimeError(
                f"fused_resnet: torch.fx cannot trace the fused forward of this {type(self).__bases__[1].__name__} "
                "(fuse replaced it to fuse its residual adds); trace with fused_resnet.fx.symbolic_trace or "
                "fused_resnet.fx.FusedTracer (which trace its own forward), or fused_resnet.unfuse(model) first")
        plan = self.__dict__["traced_plan"]
        run_args = args
        if not kwargs:
            # Trailing Nones passed for arguments that default to None: the call that leaves them out.
            variants = plan.variants
            while run_args and run_args[-1] is None and (v := variants.get(len(run_args) - 1)) and v.pad[0] is None:
                run_args = run_args[:-1]
            if len(run_args) != plan.inputs:  # trailing arguments left to their defaults: that call's plan
                plan = variants.get(len(run_args))
                run_args = run_args + plan.pad if plan is not None else run_args
            # The trace took every given argument for a value (``if shortcut is None`` was False): a None
            # among them gets the module's own forward.
            if plan is not None and any(a is None for a in run_args[:len(run_args) - len(plan.pad)]):
                plan = None
        if kwargs or plan is None or not self.fusable(plan):
            return super().forward(*args, **kwargs)
        warn_if_global_hooks()
        prepared = None
        if "_prepared" in self.__dict__:
            prepared = self.prepared_convs(plan.pairs)
        return run(self, plan, run_args, prepared)


def fuse_traced(module: nn.Module, plan: Plan) -> None:
    """Give ``module`` (this instance only) the fused forward of ``plan``, in place."""
    for join in plan.joins:  # nn.SyncBatchNorm -> SyncBatchNorm2d (runs on CPU/DDP too), as _joins does
        for slots in (join.main, join.short or ()):
            if slots:
                distributed.adopt_sync_batch_norms(slots[1][2])
    module.__dict__["class_before_fuse"] = type(module)
    module.__class__ = _foreign.subclass(FusedTracedForward, type(module))
    module.__dict__["traced_plan"] = plan


def restore(module: nn.Module) -> None:
    """Give a module fused by :func:`fuse_traced` back its own class and forward (``unfuse``)."""
    if isinstance(module, FusedTracedForward):
        module.__class__ = module.__dict__.pop("class_before_fuse")
        module.__dict__.pop("traced_plan", None)
        module.__dict__.pop("_prepared", None)


def release_broken(model: nn.Module) -> None:
    """Restore every traced module whose plan no longer applies (a child replaced, an attribute
    changed; not a hook: removed, the plan applies again), so that ``fuse`` traces it anew."""
    for m in model.modules():
        if isinstance(m, FusedTracedForward):
            plan = m.traced_plan
            attrs_ok = all(m.__dict__.get(k, _PLAIN) is v or m.__dict__.get(k, _PLAIN) == v for k, v in plan.attrs)
            joins_ok = all(slots_intact(j.slots) for j in plan.joins)
            if not (attrs_ok and joins_ok and _owners_intact(plan.owners)):
                restore(m)
