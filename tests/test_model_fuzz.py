"""Stateful fuzzing of a fused model's life: hypothesis builds a random tiny network (block types,
widths, strides, downsample or not), fuses a copy, and drives the fused model, its unfused twin and an
fp64 oracle (``_lifecycle.Trio``) through random sequences of training steps, training-mode forwards
without a step, eval forwards (no_grad / inference_mode, batch 1 or more), ``load_state_dict`` from a
fresh model, in-place parameter and buffer edits, deepcopy-then-continue, layout conversions,
``model.train()`` (and ``prepare_for_inference`` in the prepared machine), comparing after each.

Reference backend in fp64 (the twin is the oracle: exact to ~1e-10); native backend in fp32 against the
fp64 oracle (within 3x eager fp32's own error, from a common state).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from torch import nn

import fused_resnet
from fused_resnet import _backend

from _lifecycle import Trio, TinyNet, _downsample, without_onednn
from _tv_resnet import TVBasicBlock, TVBottleneck

# No shrinking phase: shrinking a failing sequence re-runs it hundreds of times (minutes on 2 cores);
# the failing sequence is printed as it was found (seeded by hypothesis's derandomised database-less run).
SETTINGS = settings(max_examples=6, stateful_step_count=8, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
EDIT_STYLES = ["no_grad", "data", "detach"]


@pytest.fixture(autouse=True)
def _no_onednn():
    """The random tiny nets meet oneDNN's memory corruption (``_lifecycle.without_onednn``); the
    fixed-shape lifecycle tests cover the oneDNN paths."""
    with without_onednn():
        yield


@st.composite
def net_configs(draw):
    """A list of (kind, planes, stride, extra_downsample) for 1-3 blocks; at most two stride-2 blocks."""
    blocks, strided = [], 0
    for _ in range(draw(st.integers(1, 3))):
        stride = draw(st.sampled_from([1, 2])) if strided < 2 else 1
        strided += stride == 2
        blocks.append((draw(st.sampled_from(["basic", "bottleneck"])), draw(st.integers(2, 5)), stride,
                       draw(st.booleans())))
    return dict(stem=draw(st.integers(2, 6)), blocks=blocks, size=draw(st.integers(7, 10)))


def build_net(cfg) -> TinyNet:
    cin, blocks = cfg["stem"], []
    for kind, planes, stride, extra_ds in cfg["blocks"]:
        cls = TVBasicBlock if kind == "basic" else TVBottleneck
        cout = planes * cls.expansion
        ds = _downsample(cin, cout, stride) if (stride != 1 or cin != cout or extra_ds) else None
        blocks.append(cls(cin, planes, stride, ds))
        cin = cout
    return TinyNet(blocks, cfg["stem"], cin)


class LifecycleMachine(RuleBasedStateMachine):
    backend, dtype = "reference", torch.float64

    @initialize(cfg=net_configs(), channels_last=st.booleans())
    def build(self, cfg, channels_last):
        reason = _backend.unavailable_reason(self.backend, "cpu")
        assert reason is None, f"{self.backend} unavailable: {reason}"
        torch.manual_seed(0)
        self.cfg = cfg
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.trio = Trio.build(lambda: build_net(cfg), dtype=self.dtype, memory_format=fmt, backend=self.backend)
        self.events = 0

    def _x(self, n):
        return torch.randn(n, 3, self.cfg["size"], self.cfg["size"], dtype=torch.float64)

    @invariant()
    def same_structure(self):
        if hasattr(self, "trio"):  # fuse's swaps are still in place, and nothing is left to fuse
            assert fused_resnet.find_fusable(self.trio.fused) == []

    @rule()
    def train_step(self):
        self.trio.step(self._x(3))

    @rule(with_grad=st.booleans())
    def train_forward_without_step(self, with_grad):
        self.trio.forward(self._x(3), train=True, grad_mode=torch.enable_grad if with_grad else torch.no_grad,
                          what="training-mode forward, no step")

    @rule(inference=st.booleans(), n=st.sampled_from([1, 3]))
    def eval_forward(self, inference, n):
        self.trio.forward(self._x(n), grad_mode=torch.inference_mode if inference else torch.no_grad,
                          what=f"eval forward ({'inference_mode' if inference else 'no_grad'}, N={n})")

    @rule(seed=st.integers(1, 2**16))
    def load_state_dict_from_fresh_model(self, seed):
        torch.manual_seed(seed)
        self.trio.fused.load_state_dict(build_net(self.cfg).state_dict())
        self.trio.forward(self._x(3), what="eval after load_state_dict")

    @rule(data=st.data(), style=st.sampled_from(EDIT_STYLES), factor=st.floats(0.5, 1.5))
    def edit_in_place(self, data, style, factor):
        """Scale one parameter or floating buffer of the fused model in place (no step, no load)."""
        named = [(n, t) for n, t in self.trio.fused.state_dict(keep_vars=True).items() if t.is_floating_point()]
        name, tensor = data.draw(st.sampled_from(named), label="tensor")
        target = tensor.data if style == "data" else tensor.detach()
        if style == "no_grad":
            with torch.no_grad():
                tensor.mul_(factor)
        else:
            target.mul_(factor)
        if "running_var" in name:
            assert (tensor > 0).all()
        if style == "data" and any("_prepared" in m.__dict__ for m in self.trio.fused.modules()):
            # `.data` writes bypass the version counters that a preparation's guard reads: the
            # documented contract (fused_resnet/inference.py) is to prepare again after them.
            fused_resnet.prepare_for_inference(self.trio.fused)
        self.trio.forward(self._x(3), what=f"eval after editing {name} in place ({style})")

    @rule()
    def deepcopy_then_continue(self):
        self.trio = self.trio.deepcopy()
        self.trio.forward(self._x(1), what="eval of a deepcopy")

    @rule(channels_last=st.booleans())
    def to_memory_format(self, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.trio.apply(lambda m: m.to(memory_format=fmt))
        self.trio.forward(self._x(3), what=f"eval after .to({fmt})")

    @rule()
    def back_to_train_mode(self):
        self.trio.apply(lambda m: m.train())
        self.trio.step(self._x(3), what="train step after model.train()")


class NativeLifecycleMachine(LifecycleMachine):
    backend, dtype = "native", torch.float32


class PreparedLifecycleMachine(NativeLifecycleMachine):
    """Adds ``prepare_for_inference`` (the serving step of the fix) to the native machine."""

    @rule(inference=st.booleans())
    def prepare_for_inference(self, inference):
        fused = self.trio.fused
        assert fused_resnet.prepare_for_inference(fused) is fused
        assert not any(m.training for m in fused.modules())
        self.trio.forward(self._x(1), grad_mode=torch.inference_mode if inference else torch.no_grad,
                          what="eval after prepare_for_inference")


TestReferenceFp64Lifecycle = LifecycleMachine.TestCase
TestReferenceFp64Lifecycle.settings = SETTINGS
TestNativeFp32Lifecycle = NativeLifecycleMachine.TestCase
TestNativeFp32Lifecycle.settings = SETTINGS
TestPreparedNativeLifecycle = PreparedLifecycleMachine.TestCase
TestPreparedNativeLifecycle.settings = SETTINGS
