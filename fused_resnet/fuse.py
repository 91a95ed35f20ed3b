"""``fuse(model)``: fuse, in place, what the model computes as conv -> BN (-> activation) and residual
blocks, keeping its classes, parameters, buffers, ``state_dict`` keys and module names.

Six rules, in this order:

- **torchvision-structured blocks**, recognised by structure, not class: any module whose children
  are exactly torchvision's ``BasicBlock`` (``conv1 bn1 relu conv2 bn2 [downsample]``) or
  ``Bottleneck`` (``conv1 bn1 conv2 bn2 conv3 bn3 relu [downsample]``) with consistent channel
  counts is swapped for ``FusedBasicBlock``/``FusedBottleneck`` (a user's copy of the block too:
  a forward other than torchvision's must have its data flow, traced with torch.fx, ``_dataflow``;
  timm's DLA blocks have the same children and another forward).
- **timm's ResNet blocks** (by the identity of their ``forward``) without SE / anti-aliasing: their
  class becomes a fused subclass of their own (``_foreign.FusedResidualBlock``), in place; so do
  timm's ResNetV2 pre-activation blocks (``_preact.FusedPreActBlock``: each BN + act applied, deferred,
  in the next conv's prologue).
- **residual joins outside ResNet blocks** (torchvision's ``InvertedResidual`` and RegNet
  ``ResBottleneckBlock``, timm's RegNet ``Bottleneck``, by the identity of their ``forward``): their
  class becomes a fused subclass of their own (``_joins.FusedResidualJoin``) whose last BN, shortcut
  BN, add and activation run as one pass; their other convs are left to the next rule.
- **adds in a user's own forward** (``_traced_joins``): a module whose ``forward`` is the user's own
  has that forward traced with torch.fx (submodules as leaves); its ``relu?(conv->BN branch + shortcut)``
  adds (and ``bn(conv(h))`` chains written out there) run fused from the traced plan, in this instance
  only (``_traced_forward.FusedTracedForward``); untraceable forwards are left as they are, with a reason.
- **the forwards of torchvision / timm modules no rule knows** (``_model_zoo_pass``): traced the
  same way, after the block rules (which keep what they know: SE gates, DropPath, dense blocks) and
  before the chain rule, whose chains inside a traced plan go with the plan.
- **conv -> BN (-> activation) chains** in every container whose forward is known (``_patterns.py``):
  the conv becomes a ``FusedConvBN2d``, the BN and the activation pass-through modules that check on
  every call that they are still where ``fuse`` found them. The activations the kernels apply:
  ``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh(0, 6)``, ``nn.SiLU``, ``nn.Hardswish``, ``nn.LeakyReLU``
  with slope 0.01 or 0.1 (``_activation.module_code``); any other runs as its own module.

Everything else runs as before; :func:`fusion_report` says, for every BatchNorm, whether it is fused
and if not, why.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _activation, _dataflow, _foreign, _joins, _patterns, _preact, _traced_forward, _traced_joins, \
    dense, distributed, resnet_arch
from .distributed import FusedAwaySyncBatchNorm2d
from ._foreign import FusedAwayNormAct, FusedResidualBlock
from .modules import (
    FusedAwayBatchNorm2d,
    FUSED_AWAY_ACT,
    FusedBasicBlock,
    FusedBottleneck,
    FusedConvBN2d,
    _FusedBlockMixin,
    downsample_pair,
    fusable_pair,
)

log = logging.getLogger("fused_resnet")

_BASIC = ("conv1", "bn1", "relu", "conv2", "bn2")
_BOTTLENECK = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu")
_PLAIN_CLASS = {FusedBasicBlock: resnet_arch.BasicBlock, FusedBottleneck: resnet_arch.Bottleneck}


def _children(module: nn.Module) -> dict[str, nn.Module | None]:
    names = dict(module.named_children())
    names.update({k: None for k, v in module._modules.items() if v is None})
    return names


def _block_class(module: nn.Module) -> type | None:
    """FusedBasicBlock / FusedBottleneck if ``module`` has that torchvision structure, else None."""
    if isinstance(module, (FusedBasicBlock, FusedBottleneck)):
        return None
    children = _children(module)
    names = set(children) - {"downsample"}
    for fused_cls, order in ((FusedBasicBlock, _BASIC), (FusedBottleneck, _BOTTLENECK)):
        if names != set(order) or type(children["relu"]) is not nn.ReLU:
            continue
        convs = [children[n] for n in order if n.startswith("conv")]
        bns = [children[n] for n in order if n.startswith("bn")]
        if not all(fusable_pair(c, b) for c, b in zip(convs, bns)):
            return None
        if any(a.out_channels != b.in_channels for a, b in zip(convs, convs[1:])):
            return None
        if fused_cls is FusedBasicBlock and any(c.kernel_size != (3, 3) for c in convs):
            return None
        if fused_cls is FusedBottleneck and (convs[0].kernel_size, convs[2].kernel_size) != ((1, 1), (1, 1)):
            return None
        # Without a downsample the block adds its input to its output: shapes must agree.
        if children.get("downsample") is None and (
            convs[0].in_channels != convs[-1].out_channels or any(c.stride != (1, 1) for c in convs)
        ):
            return None
        # The children do not say what the forward does with them (timm's DLA blocks have these
        # children and take the shortcut as an argument): a forward other than torchvision's must
        # compute what torchvision's does.
        if not _known_forward(type(module).forward) and not _dataflow.computes_as(module, _PLAIN_CLASS[fused_cls]):
            return None
        return fused_cls
    return None


class _BlockClasses:
    """:func:`_block_class` memoised for one ``fuse`` / ``find_fusable`` / ``fusion_report`` call (a
    module with torchvision's children but another forward is traced with torch.fx each time it is
    asked, and every rule asks). Keyed by the module and its class, so that a module whose class
    ``fuse`` changes in place is asked anew; it holds the module, so that its id is not reused. Made
    afresh by each call: nothing outlives the call to go stale."""

    def __init__(self):
        self._memo: dict[tuple[int, type], tuple[nn.Module, type | None]] = {}

    def __call__(self, module: nn.Module) -> type | None:
        key = (id(module), type(module))
        if key not in self._memo:
            self._memo[key] = (module, _block_class(module))
        return self._memo[key][1]

    def is_block(self, module: nn.Module) -> bool:
        return self(module) is not None


def _known_forward(forward) -> bool:
    """torchvision's ``BasicBlock``/``Bottleneck`` forward, or ``resnet_arch``'s (the same computation)."""
    where = (getattr(forward, "__module__", None), getattr(forward, "__qualname__", None))
    return where in {("torchvision.models.resnet", "BasicBlock.forward"), ("torchvision.models.resnet",
                     "Bottleneck.forward"), (resnet_arch.__name__, "BasicBlock.forward"),
                     (resnet_arch.__name__, "Bottleneck.forward")}


def _fuse_chain(chain: _patterns.Chain) -> None:
    conv, bn, relu = chain.conv, chain.bn, chain.relu
    modules = [conv, bn] + ([relu] if relu is not None else [])
    for module in modules:
        module.__dict__["class_before_fuse"] = type(module)
    conv.__class__ = FusedConvBN2d
    # Unregistered references: the state_dict keys stay where they were, and no module cycle is
    # registered. The chain's modules check them on every call (FusedConvBN2d.fused_state).
    conv.__dict__.update(fused_bn=bn, fused_relu=bool(chain.relu_slots), fused_act=chain.act,
                         fused_relu_module=relu, stem_owner=chain.container, stem_modules=modules,
                         fused_slots=tuple(chain.fused_slots), relu_slots=tuple(chain.relu_slots),
                         fused_note=chain.note)
    if _patterns.norm_act(bn):
        bn.__class__ = _foreign.subclass(FusedAwayNormAct, type(bn))
    else:
        bn.__class__ = FusedAwaySyncBatchNorm2d if distributed.is_sync_batch_norm(bn) else FusedAwayBatchNorm2d
    bn.__dict__["fused_into"] = conv
    if relu is not None:
        relu.__class__ = FUSED_AWAY_ACT[type(relu)]
        relu.__dict__["fused_into"] = conv


def _unfuse_chain(conv: FusedConvBN2d) -> None:
    """Give each module of a fused chain back the class it had before ``fuse``."""
    for module in conv.stem_modules:
        module.__class__ = module.__dict__.pop("class_before_fuse")
        for attr in ("fused_into", "fused_bn", "fused_relu", "fused_act", "fused_relu_module", "stem_owner",
                     "stem_modules",
                     "fused_slots", "relu_slots", "fused_note"):
            module.__dict__.pop(attr, None)


def find_fusable(model: nn.Module) -> list[str]:
    """Qualified names of the modules of ``model`` that :func:`fuse` would swap: blocks, residual
    joins, and the conv of each conv -> BN chain (``fusion_report`` says why the other BatchNorms are not).
    Only conv -> BN chains carry an activation into a kernel: activations elsewhere run as their own
    modules, e.g. the ReLU / SiLU and Hardsigmoid inside squeeze-excitation modules (MobileNetV3's,
    EfficientNet's), whose convs have biases and no BN."""
    block_class = _BlockClasses()
    blocks = [name for name, m in model.named_modules() if name and block_class(m) is not None]
    joins, _, taken = _joins.find(model)
    traced, _, traced_taken = _traced_joins.find(model, block_class.is_block, taken)
    found = _patterns.scan(model, block_class, taken | traced_taken)
    zoo, _, _, zoo_chains = _model_zoo_pass(model, joins, found, taken | traced_taken, block_class)
    chains = [c.name for c in zoo_chains]
    broken = [name for name, m in model.named_modules() if _patterns.broken(m) and name not in chains]
    traced_names = [_traced_joins.label(name, m) for name, (m, _) in (traced | zoo).items()]
    return (blocks + list(found.blocks) + list(found.preact) + list(joins) + traced_names + chains + broken
            + dense.find_dense(model))


def _model_zoo_pass(model: nn.Module, joins: dict, found: _patterns.Scan, taken: set[int],
                    block_class: _BlockClasses):
    """The last rule before the chains: the forwards of torchvision / timm modules that no rule
    knows (res2net's, DLA's, Xception's blocks...), traced as a user's own forward is
    (``_traced_joins.find``), outside the modules the other rules swap whole (blocks, joins, dense
    blocks and transitions). Returns ``_traced_joins.find``'s three values and the chains left to
    the chain rule (those whose conv and BN no traced plan applies)."""
    whole = [m for _, (m, _) in joins.items()] + list(found.blocks.values()) + list(found.preact.values()) + [
        m for m in model.modules() if block_class.is_block(m) or isinstance(m, (_FusedBlockMixin, *dense.FUSED))
        or dense.recognised(m)]
    inside = {id(sub) for m in whole for sub in m.modules()}
    zoo, notes, zoo_taken = _traced_joins.find(model, lambda m: id(m) in inside, taken, model_zoo=True)
    chains = [c for c in found.chains if id(c.conv) not in zoo_taken and id(c.bn) not in zoo_taken]
    return zoo, notes, zoo_taken, chains


def _block_state(block: _FusedBlockMixin, name: str) -> str:
    if block.fusable():
        return f"fused: in the residual block {name}"
    if isinstance(block, FusedResidualBlock) and _patterns.residual_block_intact(block):
        return f"fused: in the residual block {name} (in training, while its DropBlock drops, " \
               "its own forward runs)"
    return f"not fused: a module of the fused block {name} was replaced since fuse, so it runs its own forward"


def _join_states(model: nn.Module, joins) -> dict[int, str]:
    """id(BN) -> state, for the BNs of residual joins (fused, or found by ``_joins.find``)."""
    states = {}
    for name, m in model.named_modules():
        fused = isinstance(m, _joins.FusedResidualJoin)
        if not fused and name not in joins:
            continue
        join = m.fused_join if fused else joins[name][1]
        state = f"fusable: with the residual add of {name}"
        if fused:
            state = f"fused: with the residual add of {name}" if m.fusable() else (
                f"not fused: a module of the fused join {name} was replaced or has hooks, or its "
                "use_res_connect / has_skip changed, so it runs its own forward")
        for slots in (join.last, join.shortcut or ()):
            if slots:
                states[id(slots[1][0]._modules.get(slots[1][1]))] = state
    return states


def fusion_report(model: nn.Module) -> dict[str, str]:
    """For every BatchNorm of ``model``, by qualified name: ``"fused: ..."``, ``"fusable: ..."``
    (what :func:`fuse` would do now) or ``"not fused: <why>"``."""
    block_class = _BlockClasses()
    joins, join_notes, taken = _joins.find(model)
    traced, traced_notes, traced_taken = _traced_joins.find(model, block_class.is_block, taken)
    found = _patterns.scan(model, block_class, taken | traced_taken)
    zoo, zoo_notes, _, zoo_chains = _model_zoo_pass(model, joins, found, taken | traced_taken, block_class)
    found.notes.update(join_notes)
    for key, note in (traced_notes | zoo_notes).items():  # an add in a traced forward not fused, and why
        found.notes.setdefault(key, note)
    chained = {id(c.bn): f"fusable: into {c.name}" + (f" with its {_activation.NAMES[c.act]}" if c.relu_slots else "")
               + (f" ({c.note})" if c.note else "") for c in zoo_chains}
    in_block = _join_states(model, joins)
    in_block.update(_traced_joins.states(model, traced | zoo))
    for name, m in model.named_modules():
        fused_cls = block_class(m) if not isinstance(m, _FusedBlockMixin) else None
        pairs = m._chain() if isinstance(m, _FusedBlockMixin) else _patterns.tv_block_pairs(m) if fused_cls else []
        if name in found.blocks:
            pairs = [(m._modules[c], m._modules[b]) for c, b in _patterns.residual_block(m)[0]]
        if name in found.preact:  # every norm of a pre-activation block, norm1 (before any conv) too
            pairs = [(None, m._modules[n]) for n, _ in _patterns.preact_block(m)]
        elif isinstance(m, _preact.FusedPreActBlock):
            pairs = [(None, bn) for bn in m.prologue_norms()] + pairs
        ds = downsample_pair(m._modules.get("downsample")) if pairs else None
        state = f"fusable: in the residual block {name or type(m).__name__}"
        if isinstance(m, _FusedBlockMixin):
            state = _block_state(m, name or type(m).__name__)
        for _, bn in pairs + ([ds] if ds else []):
            in_block[id(bn)] = state
    report = {}
    for name, bn in model.named_modules():
        if not isinstance(bn, _BatchNorm):
            continue
        into, note = bn.__dict__.get("fused_into"), found.notes.get(id(bn))
        if into is not None:
            bn_fused, act_fused = into.fused_state()
            act = _activation.NAMES[into.__dict__.get("fused_act", _activation.RELU)]
            state = "fusable: again (a module of its chain was replaced, or given a hook, or its BN's " \
                "track_running_stats changed, since fuse)"
            if into.padding_mode != "zeros" or isinstance(into.padding, str):
                state = f"not fused: its conv's padding ({into.padding_mode}, {into.padding}) was set since fuse; " \
                    "the conv, BN and activation run as modules"
            elif bn_fused:
                state = "fused: into the preceding conv" + (f", with its {act}" if act_fused else "")
                note = note or into.__dict__.get("fused_note")
        else:
            state = in_block.get(id(bn)) or chained.get(id(bn))
        if state is None:
            state, note = "not fused: " + (note or "its container's forward is not one fuse knows, so the order "
                                           "it calls it in is unknown"), None
        report[name] = state + (f" ({note})" if note else "")
    dense_states = dense.dense_report(model)  # DenseNet blocks and transitions (dense.py)
    return {name: dense_states.get(id(bn), state) for (name, state), bn in zip(report.items(), _bns(model))}


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def fuse(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """Fuse, in place, the torchvision-structured ``BasicBlock``/``Bottleneck`` blocks of ``model``
    (swapped for ``FusedBasicBlock``/``FusedBottleneck``), timm's ResNet blocks and every conv ->
    BN (-> activation) chain of a container whose forward is known (see the module docstring);
    parameters, buffers and ``state_dict`` keys are unchanged. Returns ``model``. What was swapped
    is logged on the ``fused_resnet`` logger (INFO), and printed when ``verbose``; unrecognised
    modules are left as they are. A block passed as ``model`` itself cannot be swapped in place:
    the fused block (sharing its tensors) is returned instead."""
    block_class = _BlockClasses()
    top = block_class(model)
    if top is not None:
        fused = top.from_block(model)
        distributed.adopt_sync_batch_norms(fused)  # nn.SyncBatchNorm -> SyncBatchNorm2d: runs on CPU/DDP too
        return fused
    swapped: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            fused_cls = block_class(child)
            if fused_cls is not None:
                setattr(parent, child_name, fused_cls.from_block(child))
                distributed.adopt_sync_batch_norms(getattr(parent, child_name))
                swapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    for module in list(model.modules()):
        if _patterns.broken(module):
            _unfuse_chain(module)
    _joins.release_broken(model)
    _traced_forward.release_broken(model)
    joins, _, taken = _joins.find(model)
    for name, (block, join) in joins.items():
        _joins.fuse_join(block, join)
        swapped.append(name)
    traced, _, traced_taken = _traced_joins.find(model, block_class.is_block, taken)
    for name, (module, plan) in traced.items():  # residual adds in a user's own forward
        swapped.append(_traced_joins.label(name, module))
        _traced_forward.fuse_traced(module, plan)
    found = _patterns.scan(model, block_class, taken | traced_taken)
    for name, block in found.blocks.items():
        names, acts = _patterns.residual_block(block)
        block.__class__ = _foreign.subclass(FusedResidualBlock, type(block))
        block.__dict__.update(fused_names=names, fused_acts=acts)
        distributed.adopt_sync_batch_norms(block)
        swapped.append(name)
    for name, block in found.preact.items():
        names = _patterns.preact_block(block)  # by its own forward: before its class changes
        block.__class__ = _foreign.subclass(_preact.FusedPreActBlock, type(block))
        block.__dict__.update(fused_names=names)
        swapped.append(name)
    zoo, _, _, chains = _model_zoo_pass(model, joins, found, taken | traced_taken, block_class)
    for name, (module, plan) in zoo.items():  # the forwards of torchvision / timm modules no rule knows
        swapped.append(_traced_joins.label(name, module))
        _traced_forward.fuse_traced(module, plan)
    for chain in chains:
        _fuse_chain(chain)
        swapped.append(chain.name)
    swapped += dense.fuse_dense(model)  # DenseNet blocks and transitions (dense.py)
    message = f"fused_resnet.fuse: swapped {len(swapped)} module(s): {', '.join(swapped) or 'none'}"
    log.info(message)
    if verbose:
        print(message)
    return model
