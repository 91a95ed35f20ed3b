"""What ``fuse`` may fuse: the conv -> BN (-> activation: ReLU, ReLU6, Hardtanh(0, 6), SiLU, Hardswish,
LeakyReLU(0.01 / 0.1)) chains and residual blocks in the containers whose ``forward`` is known
(``_known_runs``: which containers, and the runs of children their forwards call in a row).

A conv followed by a BN in a run can be fused, and the activation after them too (nn.Identity between
them is skipped; timm's BatchNormAct2d brings its own). timm's ResNetV2 pre-activation blocks are
recognised here too (``preact_block``) and fused whole by ``_preact``. Other libraries are looked up in
``sys.modules`` only: fused_resnet imports neither, and a model built from them has imported them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _activation
from ._known_runs import Run, _own_type, is_own, known_runs, loaded_module  # noqa: F401  (re-exported)
from .modules import FusedConvBN2d, Slot, _FusedBlockMixin, downsample_pair, fusable_pair, has_hooks, is_fusable_bn, \
    is_fusable_conv, slots_intact


@dataclass
class Chain:
    """A conv -> BN (-> ReLU) run that ``fuse`` turns into a FusedConvBN2d and pass-through modules."""

    name: str  # the conv's qualified name
    container: nn.Module
    conv: nn.Conv2d
    bn: nn.Module
    fused_slots: list[Slot]
    relu_slots: list[Slot]  # empty when the activation is not one the conv can apply
    relu: nn.Module | None  # the activation module (_activation.module_code) that becomes a pass-through one
    act: int = _activation.NONE  # its code (NONE: no activation fused)
    note: str | None = None  # why the activation after the BN is not fused, where it says (_activation.why_not)


def norm_act(bn: nn.Module) -> bool:
    """timm's BatchNormAct2d: nn.BatchNorm2d's forward, then its own ``drop`` and ``act`` modules."""
    tna = loaded_module("timm.layers.norm_act")
    return tna is not None and is_own(bn, tna.BatchNormAct2d, "forward") and bn.track_running_stats == (
        bn.running_mean is not None)


def fusable_norm(bn: nn.Module, channels: int) -> bool:
    return is_fusable_bn(bn, channels) or (norm_act(bn) and bn.num_features == channels)


# Residual blocks (timm's, fused whole like torchvision's) ---------------------------------------


def residual_block(m: nn.Module) -> tuple[tuple, tuple] | None:
    """(conv/BN names, activation names) of a timm BasicBlock / Bottleneck, by its forward."""
    tmr = loaded_module("timm.models.resnet")
    if tmr is not None and is_own(m, tmr.BasicBlock, "forward"):
        return (("conv1", "bn1"), ("conv2", "bn2")), ("act1", "act2")
    if tmr is not None and is_own(m, tmr.Bottleneck, "forward"):
        return (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")), ("act1", "act2", "act3")
    return None


def droppable(m: nn.Module | None, cls_name: str) -> bool:
    """None, nn.Identity or timm's own DropBlock2d / DropPath (identity while inactive: ``_foreign.inactive``)."""
    timm_cls = getattr(loaded_module("timm.layers.drop"), cls_name, None)
    return m is None or type(m) is nn.Identity or is_own(m, timm_cls, "forward")


def se_gate_module(m: nn.Module | None) -> bool:
    """None, or timm's ``SEModule`` / ``EffectiveSEModule`` with their own forward and no max-pooling:
    ``x * gate(f(mean_hw(x)))`` with ``f`` their child modules (``_gates.se_gate`` runs them)."""
    if m is None:
        return True
    tse = loaded_module("timm.layers.squeeze_excite")
    return tse is not None and not getattr(m, "add_maxpool", True) and (
        is_own(m, tse.SEModule, "forward") or is_own(m, tse.EffectiveSEModule, "forward"))


def why_not_residual(m: nn.Module, names, acts) -> str | None:
    """Why the timm block ``m`` cannot run fused as a whole (None: it can)."""
    pairs = [(m._modules.get(c), m._modules.get(b)) for c, b in names]
    if not all(fusable_pair(c, b) for c, b in pairs):
        return "a conv or BN of the block is not a plain zero-padded Conv2d / BatchNorm2d"
    activations = [m._modules.get(a) for a in acts]
    codes = {_activation.module_code(a) for a in activations}
    if len(codes) != 1 or None in codes or len({id(a) for a in activations}) != len(acts):
        return "its activations are not distinct modules of one kind the kernels apply (ReLU, ReLU6, SiLU, " \
            "Hardswish, LeakyReLU 0.01 / 0.1)"
    if m.__dict__.get("se") is not None and m._modules.get("se") is None:
        return "its se is not a module"
    if not se_gate_module(m._modules.get("se")):
        return "its SE is not timm's SEModule / EffectiveSEModule without max-pooling"
    if m._modules.get("se") is not None and has_hooks(m._modules["se"]):
        return "its SE has hooks"
    if type(m._modules.get("aa")) is not nn.Identity:
        return "anti-aliasing after an activation"
    if not (droppable(m._modules.get("drop_block"), "DropBlock2d")
            and droppable(m._modules.get("drop_path"), "DropPath")):
        return "its drop_block / drop_path is not timm's"
    if any(has_hooks(x) for pair in pairs for x in pair) or any(has_hooks(a) for a in activations):
        return "a module of the block has hooks"
    convs = [c for c, _ in pairs]
    return _shape_reason(m, convs)


def _shape_reason(m: nn.Module, convs: list[nn.Module]) -> str | None:
    """Why a residual block's convs cannot be its chain: channels that do not chain, or a shape
    change without a downsample to match it (None: they can)."""
    if any(a.out_channels != b.in_channels for a, b in zip(convs, convs[1:])):
        return "its convs' channels do not chain"
    if m._modules.get("downsample") is None and (
            convs[0].in_channels != convs[-1].out_channels or any(c.stride != (1, 1) for c in convs)):
        return "no downsample, but the block changes the shape"
    return None


def residual_block_intact(block: nn.Module) -> bool:
    """Whether a fused timm block still has the structure ``fuse`` found (checked on every call)."""
    return why_not_residual(block, block.fused_names, block.fused_acts) is None


# Pre-activation blocks (timm's ResNetV2, fused whole by ``_preact``) ------------------------------


def preact_block(m: nn.Module) -> tuple[tuple[str, str], ...] | None:
    """(norm, conv) names of a timm ``PreActBottleneck`` / ``PreActBasic``, by its forward:
    ``conv_k(norm_k(...conv_1(norm_1(x)))) + shortcut`` (``downsample(norm_1(x))`` or ``x``)."""
    tmv = loaded_module("timm.models.resnetv2")
    if tmv is not None and is_own(m, tmv.PreActBottleneck, "forward"):
        return ("norm1", "conv1"), ("norm2", "conv2"), ("norm3", "conv3")
    if tmv is not None and is_own(m, tmv.PreActBasic, "forward"):
        return ("norm1", "conv1"), ("norm2", "conv2")
    return None


def preact_downsample_conv(ds: nn.Module | None) -> nn.Conv2d | None:
    """The conv of timm's ``DownsampleConv`` with ``preact=True`` (``norm`` an ``nn.Identity``): a plain
    conv of the block's pre-activation that the fused block runs with norm1 as its prologue."""
    tmv = loaded_module("timm.models.resnetv2")
    if tmv is None or not is_own(ds, tmv.DownsampleConv, "forward") or type(ds._modules.get("norm")) is not nn.Identity:
        return None
    conv = ds._modules.get("conv")
    return conv if is_fusable_conv(conv) and not has_hooks(conv) and not has_hooks(ds._modules["norm"]) else None


def why_not_preact(m: nn.Module, names) -> str | None:
    """Why the pre-activation block ``m`` cannot run fused (None: it can)."""
    norms = [m._modules.get(n) for n, _ in names]
    convs = [m._modules.get(c) for _, c in names]
    if not all(isinstance(c, nn.Conv2d) and is_fusable_conv(c) for c in convs):
        return "its convs are not plain zero-padded Conv2d(bias=False) (BiT's StdConv2d standardises its weight " \
            "on every call: a different conv)"
    for norm, conv in zip(norms, convs):
        if not (norm_act(norm) and norm.num_features == conv.in_channels):
            return f"its norms are not timm BatchNormAct2d over the conv's input channels (a {type(norm).__name__}; " \
                "GroupNormAct, BiT's, normalises per sample and group: no per-channel scale/shift for a conv prologue)"
        if type(norm.drop) is not nn.Identity or _activation.module_code(norm.act) is None:
            return "a norm's drop is not nn.Identity or its activation is not one the kernels apply (ReLU, ReLU6, " \
                "SiLU, Hardswish, LeakyReLU 0.01 / 0.1)"
    if not droppable(m._modules.get("drop_path"), "DropPath"):
        return "its drop_path is not timm's"
    mods = norms + convs + [x.act for x in norms] + [x.drop for x in norms] + [m._modules.get("drop_path"),
                                                                                m._modules.get("downsample")]
    if any(x is not None and has_hooks(x) for x in mods):
        return "a module of the block has hooks"
    return _shape_reason(m, convs)


def preact_model_note(m: nn.Module, notes: dict[int, str]) -> None:
    """Why timm ResNetV2's final ``norm`` (BN + act after the last block) is not fused, into ``notes``."""
    tmv = loaded_module("timm.models.resnetv2")
    if tmv is not None and isinstance(m, tmv.ResNetV2) and isinstance(m._modules.get("norm"), _BatchNorm):
        notes[id(m._modules["norm"])] = "the pre-activation model's final BN + act: it follows the last block's " \
            "residual add and feeds the head's pooling, no conv whose prologue could apply it; it runs as its own " \
            "module"


def preact_block_intact(block: nn.Module) -> bool:
    """Whether a fused pre-activation block still has the structure ``fuse`` found (checked on every call)."""
    return why_not_preact(block, block.fused_names) is None


# The scan --------------------------------------------------------------------------------------


def broken(conv: nn.Module) -> bool:
    """A fused chain conv one of whose modules was replaced since ``fuse`` (say by
    ``convert_sync_batchnorm``): it runs unfused (``FusedConvBN2d.fused_state``) until ``fuse``
    gives it back its class and fuses it anew, so it is judged as that class."""
    return isinstance(conv, FusedConvBN2d) and conv.fused_state() != (True, conv.fused_relu)


def _why_not_pair(conv: nn.Module | None, bn: nn.Module) -> str | None:
    if conv is None:
        return "first in its container's run: its input is not a conv output fuse can see"
    if not isinstance(conv, nn.Conv2d):
        return f"follows a {type(conv).__name__}, not a Conv2d (pre-activation or another op first)"
    if not is_fusable_conv(conv, conv.__dict__["class_before_fuse"] if broken(conv) else None, bias=True):
        return f"its conv ({type(conv).__name__}, padding_mode={conv.padding_mode!r}, padding={conv.padding!r}) " \
            "is not a plain zero-padded nn.Conv2d"
    if not fusable_norm(bn, conv.out_channels):
        return f"a {type(bn).__name__}, not nn.BatchNorm2d / SyncBatchNorm / timm BatchNormAct2d (with running stats)"
    return None


@dataclass
class Scan:
    chains: list[Chain]
    blocks: dict[str, nn.Module]  # timm blocks to fuse whole, by qualified name
    notes: dict[int, str]  # id(BN) -> why it is not fused
    preact: dict[str, nn.Module] = field(default_factory=dict)  # timm pre-activation blocks, by qualified name


def scan(model: nn.Module, block_class, taken: set[int] = frozenset()) -> Scan:
    """The chains and timm blocks ``fuse`` would fuse in ``model`` now, and why other BNs are not.
    ``block_class``: fuse's torchvision-structure test (those blocks are swapped whole first);
    ``taken``: ids of convs and BNs another rule applies (the residual joins of ``_joins``)."""
    names = {id(m): n for n, m in model.named_modules()}
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    out, reserved = Scan([], {}, {}), set(taken)
    for name, m in model.named_modules():
        chain = None
        if isinstance(m, _FusedBlockMixin) or block_class(m) is not None:
            chain = m._chain() if isinstance(m, _FusedBlockMixin) else tv_block_pairs(m)
        elif (spec := residual_block(m)) is not None:
            reason = why_not_residual(m, *spec)
            if reason is None:
                out.blocks[name] = m
                chain = [(m._modules[c], m._modules[b]) for c, b in spec[0]]
            else:
                out.notes[id(m._modules.get(spec[0][-1][1]))] = f"not with the residual add: {reason}"
        elif (pre := preact_block(m)) is None:
            preact_model_note(m, out.notes)
        else:
            reason = why_not_preact(m, pre)
            if reason is None:
                out.preact[name] = m
                chain = [(m._modules[c], m._modules[n]) for (_, c), (n, _) in zip(pre, pre[1:])]
                reserved.add(id(m._modules[pre[0][0]]))
            else:
                for n, _ in pre:
                    out.notes[id(m._modules.get(n))] = f"not in its pre-activation block: {reason}"
        if chain is not None:
            ds = downsample_pair(m._modules.get("downsample"))
            reserved.update(id(x) for pair in chain + ([ds] if ds else []) for x in pair)
            if ds is not None:
                reserved.add(id(m._modules["downsample"]))
    for name, m in model.named_modules():
        if id(m) in reserved or isinstance(m, _FusedBlockMixin) or name in out.blocks or name in out.preact:
            continue
        for run in known_runs(m) or []:
            _scan_run(run, m, names, uses, reserved, out)
    return out


def tv_block_pairs(m: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """The (conv, BN) pairs of a torchvision-structured block, in order."""
    return [(m.conv1, m.bn1), (m.conv2, m.bn2)] + ([(m.conv3, m.bn3)] if "conv3" in m._modules else [])


def _scan_run(run: Run, container, names, uses, reserved, out: Scan) -> None:
    if not slots_intact(run.guards):
        return
    mods = [owner._modules.get(n) for owner, n in run.slots]
    slots = [(owner, n, x) for (owner, n), x in zip(run.slots, mods)]
    k = 0
    while k < len(mods):
        bn = mods[k]
        if not isinstance(bn, _BatchNorm) or id(bn) in reserved or "fused_into" in bn.__dict__:
            k += 1
            continue
        conv = mods[k - 1] if k else None
        reason = _why_not_pair(conv, bn)
        if reason is None and (uses[id(conv)] > 1 or uses[id(bn)] > 1):
            reason = "its conv or BN is used more than once in the model"
        if reason is None and (has_hooks(conv) or has_hooks(bn)):
            reason = "its conv or BN has hooks"
        if reason is not None:
            out.notes.setdefault(id(bn), reason)
            k += 1
            continue
        relu_slots, relu, code, j = [], None, None, k + 1
        if norm_act(bn):  # its own drop and act run after the BN
            act = bn.act
            code = _activation.module_code(act)
            if code is not None and type(bn.drop) is nn.Identity and not has_hooks(bn.act):
                relu_slots = [(bn, "drop", bn.drop), (bn, "act", bn.act)]
        else:
            while j < len(mods) and type(mods[j]) is nn.Identity:
                j += 1
            act = mods[j] if j < len(mods) else None
            code = _activation.module_code(act)
            if code is not None and uses[id(act)] == 1 and not has_hooks(act):
                relu_slots, relu, j = slots[k + 1:j + 1], act, j + 1
        out.chains.append(Chain(names[id(conv)], container, conv, bn, run.guards + slots[k - 1:k + 1], relu_slots,
                                relu, code if relu_slots else _activation.NONE, _activation.why_not(act)))
        k = j
