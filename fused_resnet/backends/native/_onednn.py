"""Serving convolutions on the CPU by oneDNN's own fused conv, on weights reordered once.

``fused_resnet.prepare_for_inference`` (``inference.py``) asks the backend in force for a
``prepack_conv`` of each folded conv; this is the native backend's. It keeps the folded weight and
reorders it into oneDNN's blocked layout once per input shape (oneDNN's choice of layout depends on
it), on the first call with that shape, and then runs ``act(conv(x, w) + bias + residual)`` as
one oneDNN primitive (bias, residual add and activation as post-ops: ReLU, ReLU6 as ``hardtanh``,
SiLU as ``swish``, Hardswish as ``hardswish``, LeakyReLU as ``leaky_relu``; with a residual only
ReLU or none, ``_BINARY_ACTS``): ATen's
``mkldnn::_convolution_pointwise`` ops, the ones inductor's CPU freezing pass uses.

Not every conv is best served so; ``PackedConv._route`` picks one of four routes per input
signature, by a static rule measured on MobileNetV2, EfficientNet-B0 and ResNet-50 at batch 1,
224px, two threads (per-conv timings in the comments there), on an AVX2 Intel Xeon; on an AVX-512 CPU
its bounds differ (``RouteBounds``, measured on an AMD EPYC):

- ``"gemm"``: a 1x1 conv of stride 1, unpadded and ungrouped, is a matrix product over the
  channels, run as one BLAS call in the input's own layout (NCHW ``W @ x[n].view(Cin, H*W)``,
  channels_last ``x.view(N*H*W, Cin) @ W.t()``), the bias or residual as the GEMM's accumulate input
  and the activation in place: no layout conversion, no reorder. oneDNN on an NCHW input converts it
  to channels_last and the output back (MobileNetV2's 25 copies a forward), and ATen's conv of a 1x1
  NCHW input adds the bias by a broadcast pass: the GEMM took MobileNetV2's 96->24 conv at 56x56 from
  260 us (ATen) to 65 us and ResNet-50's 1024->256 at 14x14 from 560 us (oneDNN) to 420 us. Taken for
  every such conv in NCHW except above the oneDNN threshold on maps of 64 pixels or fewer with
  weights of 512K elements or more (ResNet-50's 7x7 stage, where oneDNN's blocked weight wins: 550 vs
  640 us) and, on AVX-512, above 8 M multiply-adds (ATen's conv is faster there) and on maps of 2 to
  64 pixels (a GEMM of few columns: oneDNN where measured faster, ``_FEW_PIXELS``), and in channels_last
  below 4x that threshold (oneDNN wins on ResNet-50's 51 M multiply-add 1x1 convs, the GEMM on
  EfficientNet-B0's 10.8 M ones; on AVX-512 below 4 M). It also serves a residual with an activation
  oneDNN's binary op cannot apply.
- ``"onednn"``: the prepacked conv, for a conv of at least ``FUSED_RESNET_ONEDNN_MIN_MACS``
  multiply-adds (8 M; on AVX-512 in channels_last 1 M: below, its per-call setup costs about what it
  saves) whose input is channels_last
  or not much larger than the weight; and for every depthwise conv in channels_last (a fifth faster
  than ATen's: 576 channels at 14x14 58 vs 76 us).
- ``"aten"``: below the threshold, without a residual, ATen's conv with the folded bias inside and
  the activation in place.
- None: the generic ``conv_bias_act`` op (ATen's conv and one epilogue pass): small convs with a
  residual, and depthwise convs in NCHW (ATen's depthwise kernel adds a bias by a separate broadcast
  pass: the op's epilogue, which applies the activation in the same pass, was 5-10% faster).

That rule of thumb may misjudge other shapes: ``prepare_for_inference(model, autotune=True)`` times
the routes instead, on the first call of each input signature (``PackedConv.enable_autotune``).

Why: eager PyTorch reorders every conv weight on every call, which on small batches costs as much
as the convolution in the deep stages. The reorders belong to the preparation and to nothing
else: there is no cache keyed on tensor identity or version (a compiler reusing a buffer would
make such a cache serve another weight's reorder), so they can go stale only with the preparation,
which ``inference.py`` guards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from ... import _activation


class RouteBounds(NamedTuple):
    """The static rule's bounds in multiply-adds (``PackedConv._route``): oneDNN's prepacked conv from
    ``onednn_nchw`` / ``onednn_nhwc`` on; a 1x1 conv as a GEMM below ``gemm_nhwc`` in channels_last and,
    in NCHW, below ``gemm_nchw`` (None: no bound but the narrow-map one). ``small_nchw_map``: an NCHW
    1x1 conv on a map of 2 to this many pixels takes oneDNN's conv from ``onednn_nhwc`` on, and on a map
    of at most ``_FEW_PIXELS`` always (0: no such rule; see ``_route``)."""

    onednn_nchw: int
    onednn_nhwc: int
    gemm_nhwc: int
    gemm_nchw: int | None
    small_nchw_map: int = 0


# Below ~8 M multiply-adds oneDNN's per-call setup costs about what it saves over ATen's conv (at batch
# 1 and below ATen's own oneDNN bound: im2col + one BLAS product), on an AVX2 Intel Xeon (a conv of
# ~0.5 ms on one core, measured on whole CIFAR ResNets at batch 1); 1x1 convs in channels_last were
# faster as a GEMM up to 4x that (see ``_route``). On an AVX-512 AMD EPYC (its MKL's GEMM no match for
# oneDNN's kernels) the bounds lie elsewhere: in channels_last oneDNN wins from ~0.6-1 M (one thread,
# batch 1, oneDNN vs ATen: 3x3 16->16 at 32x32, 2.4 M, 47 vs 91 us; 32->64 stride 2 at 16x16, 1.2 M,
# 32 vs 43 us; 16->16 at 16x16, 0.6 M, 28 vs 28 us; 0.15 M, 34 vs 18 us; held to AVX2 by
# ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY, ~2.4 M) and over the GEMM from ~4 M (2 threads: 1x1
# 32->192 at 28x28, 4.8 M, 52 vs 67 us; 1152->192 at 7x7, 10.8 M, 76 vs 154 us); in NCHW a 1x1 conv
# above 8 M runs faster by ATen's conv (oneDNN on the NCHW input itself) than as a GEMM (256->64 at
# 56x56 353 vs 632 us) or by the prepacked conv (645 us: a conversion to channels_last and back).
# Whole models (benchmarks/results/2026-12-02-cpu-avx512, scripts/route_bounds.py): channels_last, 2
# threads, 224 px, batch 1, MobileNetV2 / EfficientNet-B0 / RegNetY-400MF 0.93-1.01x -> 1.14-1.22x
# eager's speed, ResNet-50 1.39-1.42x -> 1.34-1.43x (within its spread); a CIFAR ResNet-20 at batch 1
# 0.68-0.72x eager's time. ATen's capability stands for oneDNN's (both follow the CPU's); other ISAs
# take the AVX2 bounds.
_AVX2_BOUNDS = RouteBounds(1 << 23, 1 << 23, 1 << 25, None)
_BOUNDS_BY_ISA = {"AVX512": RouteBounds(1 << 23, 1 << 20, 1 << 22, 1 << 23, small_nchw_map=64)}
# On that EPYC an NCHW 1x1 conv on a small map is a GEMM of the weight by a matrix of a few columns,
# which its MKL runs 3-10x slower than oneDNN (one thread, oneDNN / GEMM us): 440->440 at 2x2 60 / 201,
# at 3x3 53 / 247, at 4x4 72 / 90; 2048->512 at 2x2 101 / 963, at 7x7 630 / 1571; 256->1024 at 2x2
# 71 / 225; but at 1x1 (a matrix-vector product) 59 / 24, 86 / 60, and under 1 M multiply-adds at 4x4
# or 8x8 (208->208 38 / 22, 104->104 42 / 20) the GEMM wins. Eager's ATen conv takes the same slow
# GEMM there (RegNetY-400MF's last stage at 64 px: 2x2 maps).
_FEW_PIXELS = 9


def route_bounds() -> RouteBounds:
    """The static rule's bounds for this CPU; ``FUSED_RESNET_ONEDNN_MIN_MACS`` sets oneDNN's (both
    layouts) and the channels_last GEMM's (4x it). Read at each preparation, not at each call."""
    bounds = _BOUNDS_BY_ISA.get(torch.backends.cpu.get_cpu_capability(), _AVX2_BOUNDS)
    override = os.environ.get("FUSED_RESNET_ONEDNN_MIN_MACS")
    if override:
        macs = int(override)
        bounds = bounds._replace(onednn_nchw=macs, onednn_nhwc=macs, gemm_nhwc=4 * macs)
    return bounds


_MAX_SHAPES = 4  # input shapes a prepared conv keeps a reorder for
_TUNE_ROUNDS = 3  # timed runs of each route when autotuning (after one warm-up run)
# In NCHW a 1x1 conv above the oneDNN threshold runs as a GEMM (below ``RouteBounds.gemm_nchw``) unless
# its map has at most this many pixels and its weight at least this many elements: there oneDNN's
# blocked weight beats BLAS's narrow product (ResNet-50's 7x7 stage, 2048x512 weights); with weights up
# to 410K elements it did not (EfficientNet-B0's and MobileNetV2's 7x7 stages).
_GEMM_NARROW_PIXELS = 64
_GEMM_NARROW_MIN_WEIGHT = 1 << 19
# oneDNN's post-op (attribute and scalars of _convolution_pointwise) for each activation code.
_POST_OPS = {_activation.NONE: ("none", []), _activation.RELU: ("relu", []),
             _activation.RELU6: ("hardtanh", [0.0, 6.0]), _activation.SILU: ("swish", []),
             _activation.HARDSWISH: ("hardswish", []),
             _activation.LEAKY_RELU: ("leaky_relu", [0.01]), _activation.LEAKY_RELU_0_1: ("leaky_relu", [0.1])}
# The binary (residual add) op takes only these as its unary post-op: with the others ATen raises
# "Unary Fusion behavior undefined" (torch 2.14), so such a conv with a residual runs the generic op.
_BINARY_ACTS = (_activation.NONE, _activation.RELU)


def _pointwise_ops():
    """The oneDNN ops, where this torch has them with the schemas they have had since torch 2.0."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        unary = mkldnn._convolution_pointwise.default
        binary = mkldnn._convolution_pointwise.binary
        reorder = mkldnn._reorder_convolution_weight.default
    except (AttributeError, RuntimeError):
        return None
    counts = (len(unary._schema.arguments), len(binary._schema.arguments), len(reorder._schema.arguments))
    return (unary, binary, reorder) if counts == (10, 13, 6) else None


_OPS = _pointwise_ops() if torch.backends.mkldnn.is_available() else None


def _is_nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class PackedConv:
    """A folded conv's weight reordered for oneDNN, for inputs of one layout (the weight's)."""

    def __init__(self, weight, bias, stride, padding, dilation, groups, bounds: RouteBounds):
        # A 1x1 weight is laid out alike in both formats: it then serves inputs of either layout.
        both = weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
        self.nhwc = None if both else _is_nhwc(weight)
        fmt = torch.channels_last if self.nhwc else torch.contiguous_format
        self.conv = ([int(v) for v in padding], [int(v) for v in stride], [int(v) for v in dilation], int(groups))
        self.weight_numel = weight.numel()
        self.kernel = weight.shape[2:]
        self.bounds = bounds
        self.bias = None if bias is None else bias.detach().float().contiguous()
        # oneDNN picks a channels_last output when the weight is: the weight keeps the layout of
        # the inputs it will see, so that the output follows the input as the op's contract says.
        self.dense = weight.detach().contiguous(memory_format=fmt)
        # The reorder oneDNN picks depends on the input's size (without it, or for another size, a
        # 1x1 conv of 1024 -> 512 channels at 14x14 took 8.8 ms instead of 0.5 ms): one per input
        # shape, made on its first call, a few at most. Part of the preparation, like the fold: it
        # cannot go stale apart from it.
        self.packed: dict[tuple, torch.Tensor] = {}
        self.routes: dict[tuple, str | None] = {}  # input signature -> "onednn", "aten", "gemm" or None
        self.aten_conv = (self.conv[1], self.conv[0], self.conv[2], self.conv[3])  # stride, padding, dilation, groups
        # A 1x1 conv of stride 1, unpadded and ungrouped, is a matrix product over the channels: the
        # "gemm" route's operands (dilation does not matter to a 1x1 kernel).
        pointwise = tuple(self.kernel) == (1, 1) and self.conv[0] == [0, 0] and self.conv[1] == [1, 1] \
            and self.conv[3] == 1
        self.matrix = self.dense.reshape(weight.shape[0], -1) if pointwise else None  # [Cout, Cin]
        self.bias_column = None if self.bias is None else self.bias[:, None]  # added along NCHW's rows
        self.depthwise = self.conv[3] > 1 and weight.shape[0] == self.conv[3] and weight.shape[1] == 1
        self.generic: Callable | None = None  # set by enable_autotune

    def _packed_for(self, shape: tuple) -> torch.Tensor:
        packed = self.packed.get(shape)
        if packed is None:
            if len(self.packed) >= _MAX_SHAPES:  # serving sees few sizes; a stream of new ones starts over
                self.packed.clear()
            packed = self.packed[shape] = _OPS[2](self.dense, *self.conv, list(shape))
        return packed

    def _macs(self, x: torch.Tensor) -> int:
        padding, stride, dilation, _ = self.conv
        out = 1
        for d in range(2):
            size = x.shape[d + 2] + 2 * padding[d] - dilation[d] * (self.kernel[d] - 1) - 1
            out *= max(size // stride[d] + 1, 0)
        return x.shape[0] * self.weight_numel * out

    def _can_onednn(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether the prepacked oneDNN conv can take this input: fp32, 4-D, not empty, in the
        weight's layout (or one alike in both), an fp32 residual if any."""
        if x.dtype != torch.float32 or x.dim() != 4 or x.numel() == 0:
            return False
        nhwc = _is_nhwc(x)
        # An input laid out alike in both formats (H = W = 1) suits either weight layout.
        either = not nhwc and x.is_contiguous(memory_format=torch.channels_last)
        return not ((self.nhwc is not None and nhwc != self.nhwc and not either) or (
            residual is not None and residual.dtype != torch.float32))

    def _can_gemm(self, x: torch.Tensor) -> bool:
        """Whether the "gemm" route takes this input (one that ``_can_onednn`` takes): a 1x1 conv of
        stride 1, unpadded, ungrouped, on an input dense in NCHW or channels_last (a view as a matrix)."""
        return self.matrix is not None and (x.is_contiguous() or _is_nhwc(x))

    def _route(self, x: torch.Tensor, residual: torch.Tensor | None) -> str | None:
        """What the shapes, strides and dtypes alone decide (see ``__call__``): ``"onednn"``, ``"aten"``,
        ``"gemm"`` or None (the generic op)."""
        if not self._can_onednn(x, residual):
            return None
        nhwc = _is_nhwc(x)
        # An NCHW input is converted to channels_last and back by oneDNN: passes over the
        # activations that pay off only where the weight is not much smaller than the input.
        macs = self._macs(x)
        bounds = self.bounds
        onednn = (nhwc or self.weight_numel * 4 >= x.numel()) and \
            macs >= (bounds.onednn_nhwc if nhwc else bounds.onednn_nchw)
        if nhwc:
            gemm = macs < bounds.gemm_nhwc
        else:
            pixels = x.shape[2] * x.shape[3]
            gemm = (not onednn or pixels > _GEMM_NARROW_PIXELS or self.weight_numel < _GEMM_NARROW_MIN_WEIGHT) \
                and (bounds.gemm_nchw is None or macs < bounds.gemm_nchw)
            if 1 < pixels <= bounds.small_nchw_map and self._can_gemm(x) and self.weight_numel * 4 >= x.numel():
                # A GEMM of few columns (see _FEW_PIXELS): oneDNN's conv instead, where measured faster.
                onednn = pixels <= _FEW_PIXELS or macs >= bounds.onednn_nhwc
                gemm = not onednn
        if gemm and self._can_gemm(x):
            # A 1x1 conv as one BLAS product, no layout conversion, bias and residual by the GEMM's
            # accumulate and the activation in place (batch 1, 224px, 2 threads): in NCHW faster than
            # oneDNN (which converts to channels_last and back) and ATen's conv everywhere but on
            # ResNet-50's 7x7 stage (1024->256 at 14x14 420 vs 560 us oneDNN, MobileNetV2's 96->24
            # at 56x56 65 vs 260 us ATen, EfficientNet-B0's 1152->192 at 7x7 160 vs 220 us oneDNN;
            # ResNet-50's 2048->512 at 7x7 640 vs 550 us oneDNN); in channels_last below 4x the
            # oneDNN threshold (MobileNetV2's 192->32 at 28x28 with a residual 60 vs 105 us the op,
            # 144->32 45 vs 80 us ATen; EfficientNet-B0's 10.8 M multiply-add 1x1 convs 140-300 us,
            # 5-30% under oneDNN's, with SiLU), oneDNN above it (ResNet-50's 51 M: 10-20% faster).
            return "gemm"
        if onednn:
            return "onednn"
        if self.depthwise:
            # Depthwise, below the threshold (batch 1, 224px, ReLU6, min of 40 interleaved runs): in
            # channels_last oneDNN's prepacked conv beats ATen's by a fifth (3x3 576 channels at 14x14
            # 58 vs 76 us, 144 at 56x56 140 vs 171 us, 5x5 240 at 28x28 104 vs 124 us); in NCHW the op
            # (ATen's conv, then bias and activation in one pass) beats ATen's conv with the bias inside,
            # whose depthwise kernel adds it by a broadcast pass (144 at 56x56 354 vs 378 us, 5x5 32 at
            # 112x112 401 vs 437 us; 5-10% on most shapes, in two runs on a loaded machine).
            return "onednn" if nhwc else None
        # Too small for the reorder to pay: ATen's conv with the bias inside (oneDNN's own bias
        # post-op) and the activation in place beat the op's conv + epilogue pass on dense convs (a
        # session before the gemm route: MobileNetV2's 1x1 32->192 at 28x28 105 vs 118 us); with a
        # residual the op's single epilogue pass stays (ATen would need two).
        return "aten" if residual is None else None

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, act: int) -> torch.Tensor | None:
        """The conv's output, or None where this path does not apply (autograd on, another dtype or
        layout than prepared for, oneDNN disabled, a route of None: see the module docstring): the
        caller then runs the generic ``conv_bias_act``."""
        # torch.backends.mkldnn.enabled read without its descriptor (~0.2 us, every call).
        if torch.is_grad_enabled() or not torch._C._get_mkldnn_enabled():
            return None
        route = self.route_for(x, residual, act)
        return None if route is None else self._run(route, x, residual, act)

    def route_for(self, x: torch.Tensor, residual: torch.Tensor | None, act: int) -> str | None:
        """The route of this input signature (``"onednn"``, ``"aten"``, ``"gemm"``; None: the generic op),
        decided on its first call (``_route``'s rule, or timed when autotuning) and kept; for an input
        ``_can_onednn`` takes, with autograd off and oneDNN enabled (``__call__`` checks those)."""
        # The static part of the decision, once per input signature: on a small model the checks
        # cost as much host time as the conv (a few us per conv, measured on MobileNetV2 at batch 1).
        key = (x.shape, x.stride(), x.dtype, None if residual is None else residual.dtype)
        route = self.routes.get(key, False)
        if route is False:
            if len(self.routes) >= 4 * _MAX_SHAPES:
                self.routes.clear()
            route = self._route(x, residual) if self.generic is None else self._tune(x, residual, act)
            self.routes[key] = route
        if route is None or (route == "onednn" and residual is not None and act not in _BINARY_ACTS):
            return None
        return route

    def enable_autotune(self, generic: Callable) -> None:
        """Choose each input signature's route by timing instead of by the static rule: on the first
        call with a new signature, every route that can take it (``"onednn"``, ``"aten"``, ``"gemm"``
        and the generic op, run by ``generic(x, residual, act)``) runs a few times and the fastest is kept
        for that signature. As ``torch.backends.cudnn.benchmark``: the first call of each input
        size costs a few convolutions more, and the route (so the last bits of the output, all
        routes being fp32 convolutions of the same operands) may differ from one process to the next."""
        self.generic = generic
        self.routes.clear()

    def _tune(self, x: torch.Tensor, residual: torch.Tensor | None, act: int) -> str | None:
        """The fastest route for this signature (see ``enable_autotune``)."""
        candidates: list[str | None] = [None]
        if self._can_onednn(x, residual):
            candidates += ["onednn"] + (["aten"] if residual is None else []) + (["gemm"] if self._can_gemm(x) else [])
        if len(candidates) == 1:
            return None
        run = {route: (lambda r=route: self._run(r, x, residual, act)) for route in candidates if route}
        run[None] = lambda: self.generic(x, residual, act)
        best = dict.fromkeys(candidates, float("inf"))
        for fn in run.values():  # warm-up: the oneDNN reorder for this shape, allocator, caches
            fn()
        for _ in range(_TUNE_ROUNDS):  # interleaved, best of rounds: the least disturbed by other load
            for route, fn in run.items():
                start = time.perf_counter()
                fn()
                best[route] = min(best[route], time.perf_counter() - start)
        return min(candidates, key=best.__getitem__)

    def _gemm(self, x: torch.Tensor, residual: torch.Tensor | None, act: int) -> torch.Tensor:
        """The 1x1 conv as a matrix product in the input's own layout (``_can_gemm``): NCHW
        ``out[n] = W @ x[n].view(Cin, H*W)``, channels_last ``x.view(N*H*W, Cin) @ W.t()``; the bias
        (or the residual, then the bias by one pass) as the GEMM's accumulate input, the activation in
        place. The output is in the input's layout."""
        n, c, h, w = x.shape
        weight, bias, cout = self.matrix, self.bias, self.matrix.shape[0]
        if _is_nhwc(x):
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: channels_last is [N*H*W, C]
            if residual is None:
                out = torch.mm(rows, weight.t()) if bias is None else torch.addmm(bias, rows, weight.t())
            else:
                out = torch.addmm(residual.permute(0, 2, 3, 1).reshape(n * h * w, cout), rows, weight.t())
                if bias is not None:
                    out.add_(bias)
            out = out.view(n, h, w, cout).permute(0, 3, 1, 2)
        else:
            # The accumulate input: the residual, else the bias as a column that addmm / baddbmm broadcast.
            if n == 1:  # a plain 2-D product (bmm's batching costs host time at batch 1)
                acc = self.bias_column if residual is None else residual.reshape(cout, h * w)
                cols = x.view(c, h * w)
                out = torch.mm(weight, cols) if acc is None else torch.addmm(acc, weight, cols)
            else:
                acc = self.bias_column if residual is None else residual.reshape(n, cout, h * w)
                cols = x.view(n, c, h * w)
                out = torch.matmul(weight, cols) if acc is None else torch.baddbmm(acc, weight.expand(n, cout, c), cols)
            if residual is not None and bias is not None:
                out.add_(self.bias_column)
            out = out.view(n, cout, h, w)
        return _activation.apply(out, act, inplace=True)

    def _run(self, route: str, x: torch.Tensor, residual: torch.Tensor | None, act: int) -> torch.Tensor:
        if route == "gemm":
            return self._gemm(x, residual, act)
        nhwc = _is_nhwc(x)
        fmt = torch.channels_last if nhwc else torch.contiguous_format  # the output's: _layout.py's rule
        if route == "aten":
            out = torch.conv2d(x, self.dense, self.bias, *self.aten_conv)
            return _activation.apply(out, act, inplace=True).contiguous(memory_format=fmt)
        either = not nhwc and x.is_contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last if nhwc or (either and self.nhwc) else fmt)
        packed = self._packed_for(tuple(x.shape))
        attr, scalars = _POST_OPS[act]
        if residual is None:
            out = _OPS[0](x, packed, self.bias, *self.conv, attr, scalars, None)
        else:
            residual = residual.contiguous(memory_format=fmt)
            out = _OPS[1](x, residual, packed, self.bias, *self.conv, "add", None, None if attr == "none" else attr,
                          scalars, None)
        return out.contiguous(memory_format=fmt)


def supports(weight, bias, stride, padding, dilation, groups) -> bool:
    return _OPS is not None and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 4


def prepack_conv(weight, bias, stride, padding, dilation, groups) -> PackedConv:
    """``weight`` (a folded conv weight, fp32, on the CPU) reordered for oneDNN (see the module docstring)."""
    return PackedConv(weight, bias, stride, padding, dilation, groups, route_bounds())
