"""Residual adds written in a user's own ``forward``: found with torch.fx, fused by ``_traced_forward``.

Module structure cannot show an add in a parent's ``forward`` (``relu(x + self.body(x))``), so for a
module whose ``forward`` is the user's own (defined outside torch, torchvision, timm and fused_resnet,
whose classes are recognised by identity elsewhere) and that has a child ending in a BN, that one
``forward`` is traced with torch.fx, every submodule a leaf (whole-model ``symbolic_trace`` fails on
some models; nothing but this forward is traced, and a failure only leaves the module as it is).

A *join* is ``add(a, b)`` (``+``, ``+=``, ``torch.add``, ``.add``; no ``alpha``), optionally followed
by an activation the kernels apply (``_activation``'s: ReLU, ReLU6, SiLU, Hardswish, LeakyReLU of
slope 0.01 or 0.1; as ``F.relu`` / ``torch.relu`` / ``.relu()`` / ``.relu_()``, ``F.relu6``,
``F.hardtanh(x, 0, 6)``, ``F.silu``, ``F.hardswish``, ``F.leaky_relu``, or such a module child; in
place or not) that reads only the add, where ``a`` is the main branch: the output of a child ``nn.Sequential``
ending in conv -> BN, or of ``self.bn(self.conv(h))``, read by nothing but the add. ``b`` is a
conv -> BN shortcut of the same kinds, or any other tensor (the module's input, a pooled shortcut).
A chain ``bn(conv(h))`` (-> ReLU) written out in the forward whose one reader is a plain conv is
left deferred for that conv's prologue (``_traced_forward``'s ``conv_in`` step).
Only straight-line forwards: a trace that fails (data-dependent control flow), a forward that traces
differently in training and in eval, or operands read elsewhere leave the module as it is, with the
reason in ``fusion_report``. Python ``if``/``for`` on attributes and children are specialised at
fuse time and checked on every call (``_traced_forward``).
"""

from __future__ import annotations

import inspect
import operator
import warnings
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _activation, _joins, _patterns
from ._traced_acts import act_after
from ._traced_forward import _PLAIN, FusedTracedForward, Plan, Ref, TracedJoin
from .modules import has_hooks, is_fusable_conv

_LIBRARIES = ("torch", "torchvision", "timm", "fused_resnet")
_ADDS = (operator.add, operator.iadd, torch.add)
class _LeafTracer(fx.Tracer):
    """Traces one module's own forward: every submodule call is a leaf (``call_module``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _forward_library(m: nn.Module) -> str:
    """The top-level package of the code of ``m``'s forward (a user's own: not in ``_LIBRARIES``)."""
    return (getattr(type(m).forward, "__module__", None) or "").split(".")[0]


def _own_forward(m: nn.Module) -> bool:
    return _forward_library(m) not in _LIBRARIES


def _model_zoo_forward(m: nn.Module) -> bool:
    """A torchvision or timm module's forward: traced only after the rules that know their
    blocks by class (``fuse``'s library pass), for the modules none of them knows."""
    return _forward_library(m) in ("torchvision", "timm")


def _bn_ends(m: nn.Module) -> list[nn.Module]:
    """The BNs that end ``m``'s children (a BN child, or the last child of a Sequential child; in a
    ModuleList / ModuleDict child too)."""
    ends, children = [], []
    for child in m.children():  # a ModuleList / ModuleDict's modules are called by the forward itself
        children += list(child.children()) if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child]
    for child in children:
        if _patterns.is_own(child, nn.Sequential, "forward") and len(child):
            child = child[-1]
        if isinstance(child, _BatchNorm):
            ends.append(child)
    return ends


def _plain(v) -> bool:
    """A value a forward may branch on in Python, checked on every call: None, bool, int, float, str,
    or a tuple of them."""
    return isinstance(v, _PLAIN) or (type(v) is tuple and all(isinstance(x, _PLAIN) for x in v))


def _trace(m: nn.Module, concrete: dict | None = None) -> tuple[fx.Graph | None, str | None]:
    """``m``'s forward traced (in training and eval: the same graph), or None and why not.
    ``concrete``: trailing parameters left to their defaults (``_shorter_calls``)."""
    graphs, training = [], m.training
    saved = {k: v for k, v in m.__dict__.items() if _plain(v)}  # a forward that counts its calls
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for mode in (True, False):  # the module's own flag only: its children are leaves
                m.training = mode
                graphs.append(_LeafTracer().trace(m, concrete_args=concrete))
    except Exception as e:  # noqa: BLE001 - any failure leaves the module as it is, with the reason
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return None, f"its forward cannot be traced by torch.fx ({type(e).__name__}: {first})"
    finally:
        changed = [k for k, v in saved.items() if k != "training" and m.__dict__.get(k, _PLAIN) is not v]
        m.__dict__.update(saved)
        m.training = training
    if changed:  # a Python side effect the graph does not record, so a plan would not repeat it
        return None, f"its forward sets {', '.join(changed)}"
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        return None, "its forward differs in training and eval"
    return graphs[0], None


def _slot(root: nn.Module, path: str) -> tuple:
    owner_path, _, name = path.rpartition(".")
    owner = root.get_submodule(owner_path)
    return owner, name, owner._modules[name]


def _single_input(node: fx.Node) -> fx.Node | None:
    ok = not node.kwargs and len(node.args) == 1 and isinstance(node.args[0], fx.Node)
    return node.args[0] if ok else None


def _branch(node, root, uses, calls, operand=True) -> tuple[tuple | None, str | None]:
    """``((conv slot, BN slot), Sequential or None, input node), None`` when ``node`` is a conv -> BN
    branch the join can apply; ``None, why-not`` (or ``None, None`` when it is no such branch).
    ``operand``: an add's operand (read by nothing else), else a chain written out in the forward."""
    if node.op != "call_module" or _single_input(node) is None:
        return None, None
    mod = root.get_submodule(node.target)
    if _patterns.is_own(mod, nn.Sequential, "forward") and len(mod) >= 2:
        names = list(mod._modules)
        slots, seq, inp = (_slot(mod, names[-2]), _slot(mod, names[-1])), mod, node.args[0]
    elif isinstance(mod, _BatchNorm) and node.args[0].op == "call_module":
        conv_node = node.args[0]
        if _single_input(conv_node) is None or len(conv_node.users) != 1 or calls[conv_node.target] != 1:
            return None, None
        slots, seq, inp = (_slot(root, conv_node.target), _slot(root, node.target)), None, conv_node.args[0]
    else:
        return None, None
    conv, bn = slots[0][2], slots[1][2]
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, _BatchNorm):
        return None, None
    if not (is_fusable_conv(conv, bias=True) and _joins._plain_norm(bn, conv.out_channels)):
        return None, "its conv -> BN is not a plain zero-padded Conv2d -> BatchNorm2d"
    if (operand and len(node.users) != 1) or calls[node.target] != 1 or any(uses[id(x)] > 1 for x in (mod, conv, bn)):
        return None, "the branch's output or modules are used elsewhere too"
    if any(has_hooks(x) for x in (mod, conv, bn)):
        return None, "a module of the branch has hooks"
    return (slots, seq, inp), None


def _add_operands(node: fx.Node) -> tuple | None:
    """(a, b, in place) of an add of two tensors without ``alpha``, else None."""
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    if node.op == "call_function" and node.target in _ADDS:
        return node.args[0], node.args[1], node.target is operator.iadd
    if node.op == "call_method" and node.target in ("add", "add_"):
        return node.args[0], node.args[1], node.target == "add_"
    return None


def _find_joins(root, graph, uses) -> tuple[list, dict[int, str]]:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    joins, notes = [], {}
    for node in graph.nodes:
        operands = _add_operands(node)
        if operands is None:
            continue
        a, b, inplace = operands
        (main, why_a), (short, why_b) = _branch(a, root, uses, calls), _branch(b, root, uses, calls)
        for why, n in ((why_a, a), (why_b, b)):
            if why is not None:
                bn = root.get_submodule(n.target)
                bn = bn[-1] if isinstance(bn, nn.Sequential) else bn
                notes[id(bn)] = f"not with the residual add: {why}"
        if main is None:
            main, short, a, b = short, None, b, a
        if main is None or (inplace and node.args[0] is not a and short is None):
            continue  # no conv -> BN branch, or an add into a tensor that others may read
        joins.append((node, act_after(node, root), a, main, b, short, None))
    taken = {n for j in joins for n in (j[2], j[4]) if n is not None}
    # bn(conv(h)) (-> ReLU) written out in the forward, not an add's branch; a ResNet-like model's stem
    # (conv1 -> bn1, _patterns.known_runs) is left to the chain rule, as before.
    for node in graph.nodes if _patterns.known_runs(root) is None else ():
        if node.op == "call_module" and node not in taken and isinstance(root.get_submodule(node.target), _BatchNorm):
            chain, _ = _branch(node, root, uses, calls, operand=False)
            if chain is None and not (node.args and isinstance(node.args[0], fx.Node)
                                      and node.args[0].op == "call_module"):
                notes.setdefault(id(root.get_submodule(node.target)), "its input is not a conv's output in this "
                                 "forward (a pre-activation BN: fused only in timm's ResNetV2 blocks)")
            if chain is not None and chain[1] is None:
                relu = act_after(node, root)
                joins.append((node, relu, node, chain, None, None, _consumer(relu[0] if relu else node, root, uses,
                                                                             calls)))
    # A conv that another join or chain runs itself (bn(conv(h)) written out) is no "conv_in" consumer.
    absorbed = {op.args[0] for j in joins for op, br in ((j[2], j[3]), (j[4], j[5]))
                if br is not None and br[1] is None}
    return [j[:6] + (None if j[6] in absorbed else j[6],) for j in joins], notes


def _consumer(node: fx.Node, root: nn.Module, uses, calls) -> fx.Node | None:
    """The plain conv (``call_module``) that alone reads a chain's output ``node`` and nothing else, used
    once in the model and without hooks: it can apply the chain's BN (and ReLU) in its prologue."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or _single_input(user) is not node or calls[user.target] != 1:
        return None
    conv = root.get_submodule(user.target)
    ok = isinstance(conv, nn.Conv2d) and is_fusable_conv(conv) and uses[id(conv)] == 1 and not has_hooks(conv)
    return user if ok else None


def _arg(a, pos):
    if isinstance(a, fx.Node):
        return Ref(pos[a])
    if isinstance(a, (tuple, list)):
        items = [_arg(v, pos) for v in a]
        return tuple(items) if isinstance(a, tuple) else items
    if isinstance(a, dict):
        return {k: _arg(v, pos) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_arg(a.start, pos), _arg(a.stop, pos), _arg(a.step, pos))
    return a


def _owners(root: nn.Module, graph: fx.Graph) -> list:
    """Every container on a traced module path (the root always), with the children it holds now."""
    paths = {""}
    for n in graph.nodes:
        if n.op == "call_module":
            parts = n.target.split(".")
            paths.update(".".join(parts[:i]) for i in range(len(parts)))
    owners = [root.get_submodule(p) for p in sorted(paths)]
    return [(o, tuple(o._modules), tuple(o._modules.values())) for o in owners]


def _plan(root: nn.Module, graph: fx.Graph, found: list) -> Plan:
    """The plan of ``graph``: every node a step, but each join's branches, add and ReLU one join step."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    pos = {n: i for i, n in enumerate(inputs)}
    branches, adds, relus, skip, joins, consumers = {}, {}, {}, set(), [], {}
    for node, relu, a, main, b, short, consumer in found:
        adds[node] = (len(joins), a, b)
        if consumer is not None:
            consumers[consumer] = relu[2] if relu is not None else _activation.NONE
        joins.append(TracedJoin(main[0], main[1], short[0] if short else None, short[1] if short else None,
                                relu[2] if relu is not None else _activation.NONE, relu[1] if relu else None,
                                add=b is not None,
                                consumer=_slot(root, consumer.target) if consumer is not None else None))
        if relu is not None:
            relus[relu[0]] = node
        for operand, branch in ((a, main), (b, short)):
            if branch is not None:
                branches[operand] = branch
                if branch[1] is None:  # bn(conv(h)) written out: the conv node moves into the join
                    skip.add(operand.args[0])
    steps = []

    def emit(node, step):
        steps.append(step)
        pos[node] = len(inputs) + len(steps) - 1

    for node in graph.nodes:
        if node.op == "placeholder" or node in skip:
            continue
        if node in adds and adds[node][2] is None:  # a chain: conv, BN (and ReLU) in one step
            emit(node, ("join", adds[node][0], Ref(pos[branches[node][2]]), None))
        elif node in branches:
            _, seq, inp = branches[node]
            if seq is not None:  # the Sequential's children before its conv and BN, at its place
                emit(node, ("prefix", seq, Ref(pos[inp])))
            else:
                pos[node] = pos[inp]  # the join reads the conv's input
        elif node in adds:
            k, a, b = adds[node]
            emit(node, ("join", k, Ref(pos[a]), Ref(pos[b])))
        elif node in relus:
            pos[node] = pos[relus[node]]  # applied by the join
        elif node in consumers:
            emit(node, ("conv_in", root.get_submodule(node.target), Ref(pos[node.args[0]]), consumers[node]))
        elif node.op == "call_module":
            emit(node, ("call_module", root.get_submodule(node.target), _arg(node.args, pos), _arg(node.kwargs, pos)))
        elif node.op in ("call_function", "call_method"):
            emit(node, (node.op, node.target, _arg(node.args, pos), _arg(node.kwargs, pos)))
        elif node.op == "get_attr":
            emit(node, ("get_attr", node.target))
        elif node.op == "output":
            steps.append(("output", _arg(node.args[0], pos)))
    attrs = [(k, v) for k, v in root.__dict__.items() if not k.startswith("_") and k != "training" and _plain(v)]
    return Plan(len(inputs), steps, joins, _owners(root, graph), attrs)


def label(name: str, m: nn.Module) -> str:
    """``name``, or for the model itself its own class's name."""
    return name or m.__dict__.get("class_before_fuse", type(m)).__name__


def _join_ids(plan: Plan) -> set[int]:
    return {id(s[2]) for j in plan.joins for s in j.slots}


def find(model: nn.Module, skip, taken: set[int] = frozenset(), model_zoo: bool = False):
    """The modules whose own forward ``fuse`` would give fused joins: ``{name: (module, Plan)}``; why
    others are not (``id(BN) -> why``); the ids of the convs and BNs the joins (found now or fused
    before) apply, which the chain rule skips. ``skip(m)``: modules another rule swaps whole.
    ``model_zoo``: trace torchvision's and timm's modules instead of the user's own."""
    traced_here = _model_zoo_forward if model_zoo else _own_forward
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    found, notes, reserved = {}, {}, set()
    for name, m in model.named_modules():
        if isinstance(m, FusedTracedForward):
            reserved |= _join_ids(m.traced_plan)
            for key, note in m.traced_plan.notes.items():  # what its trace found not fusable, as at fuse
                notes.setdefault(key, note)
            continue
        if not traced_here(m) or skip(m) or not (ends := _bn_ends(m)):
            continue
        graph, why = _trace(m)
        if graph is None:
            for bn in ends:
                notes.setdefault(id(bn), f"no add or conv -> BN fused in the forward of {label(name, m)}: {why}")
            continue
        joins, join_notes = _find_joins(m, graph, uses)
        for key, note in join_notes.items():
            notes.setdefault(key, note)
        if not joins:
            continue
        try:
            plan = _plan(m, graph, joins)
        except KeyError:  # a node reads a value the joins absorb: leave the module as it is
            continue
        ids = _join_ids(plan)
        if ids & (reserved | set(taken)):
            continue
        plan.notes = join_notes
        plan.variants = _shorter_calls(m, plan, uses)
        found[name] = (m, plan)
        reserved |= ids
    return found, notes, reserved


def _shorter_calls(m: nn.Module, plan: Plan, uses) -> dict[int, Plan]:
    """Plans of ``m``'s forward called with fewer positional arguments than ``plan`` was traced with
    (timm's DLA trees call a block ``(x, shortcut)`` or ``(x)``), by that count: the trailing ones
    left to their plain defaults, which the trace specialises on (``if shortcut is None``). Kept only
    where the joins fuse the same (conv, BN) pairs in the same order as ``plan``, so that its prepared
    convs and ``fusion_report`` states hold for them too."""
    try:
        params = list(inspect.signature(type(m).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) != plan.inputs or any(p.kind not in positional for p in params):
        return {}
    want = [(id(c), id(b)) for c, b in plan.pairs]
    variants = {}
    for given in range(len(params) - 1, 0, -1):
        tail = params[given:]
        if tail[0].default is inspect.Parameter.empty or not _plain(tail[0].default):
            break
        graph, _ = _trace(m, {p.name: p.default for p in tail})
        joins = _find_joins(m, graph, uses)[0] if graph is not None else []
        try:
            variant = _plan(m, graph, joins) if joins else None
        except KeyError:
            continue
        if variant is not None and variant.inputs == plan.inputs and [(id(c), id(b)) for c, b in variant.pairs] == want:
            variant.pad = tuple(p.default for p in tail)
            variants[given] = variant
    return variants


def states(model: nn.Module, found: dict) -> dict[int, str]:
    """``fusion_report``'s states of the joins' and chains' BNs (fused, or found by :func:`find`), by id."""
    out = {}
    for name, m in model.named_modules():
        fused = isinstance(m, FusedTracedForward)
        if not fused and name not in found:
            continue
        plan, where = (m.traced_plan if fused else found[name][1]), f"in the forward of {label(name, m)}"
        state = f"fusable: with the residual add {where}"
        if fused:
            state = f"fused: with the residual add {where}" if m.fusable() else (
                f"not fused: a module or attribute of {label(name, m)} changed since fuse, or a module of the "
                "join has hooks, so it runs its own forward")
        for join in plan.joins:
            for slots in (join.main, join.short or ()):
                if slots:
                    act = f" and {_activation.LABELS[join.act]}" if join.act else ""
                    out[id(slots[1][2])] = state if join.add else state.replace("with the residual add",
                                                                                f"with its conv{act}")
    return out
