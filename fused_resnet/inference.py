"""Serving: :func:`prepare_for_inference` folds every fused BN into its conv once, on the user's call.

In eval a fused module runs each conv+BN as one conv with the BN folded into its weight and bias
(``ops.fold_bn``), bias, residual and ReLU applied in the conv's epilogue. Without preparation the
fold is recomputed on every forward: always right, a few small per-channel ops and one pass over
each weight per call. :func:`prepare_for_inference` does it once, explicitly (as IPEX's
``optimize`` does), and lets the backend prepack the folded weight too (the native CPU backend
reorders it for oneDNN). There is no implicit cache: a cache keyed on tensor identity or version
counters goes stale when a compiler reuses a buffer or a kernel writes through a raw pointer.

The prepared state is dropped by ``model.train()``, ``load_state_dict``, ``.to()`` / ``.half()`` /
``.cuda()`` (any ``Module._apply``), and it is neither pickled nor deep-copied (a copy, e.g. an EMA
model, starts unprepared). It is used only in eager mode without autograd (``no_grad`` /
``inference_mode``): under ``torch.compile``, ``torch.export`` or tracing a fused module emits plain
ATen from its parameters (the compiler folds and fuses itself, with ``freezing`` for constants).
As a guard for what the model cannot see, each prepared conv checks on every call that its conv
and BN still hold the same tensors, unchanged since the preparation (an optimizer step, an EMA
update, a ``load_state_dict`` of a submodule): if not, it warns once and the module runs unprepared
again, with the right numbers, until :func:`prepare_for_inference` is called again. Writes through
``.data`` do not move the version counters the guard reads: after those, prepare again.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from . import _activation, _backend, ops
from ._layout import conv_output_size
from ._library import NAMESPACE

_conv_bias_act = getattr(torch.ops, NAMESPACE).conv_bias_act.default


def _get(module: nn.Module, store: dict, name: str):
    """``getattr(module, name)``, read from the module's own dict first (nn.Module.__getattr__ costs
    ~0.5 us, on every prepared call); anything else (a parametrization's property) by getattr."""
    value = store.get(name)
    return value if value is not None else getattr(module, name, None)


def _sources(conv: nn.Conv2d, bn: nn.Module) -> tuple:
    params, buffers = bn._parameters, bn._buffers
    return (_get(conv, conv._parameters, "weight"), _get(bn, params, "weight"), _get(bn, params, "bias"),
            _get(bn, buffers, "running_mean"), _get(bn, buffers, "running_var"), _get(conv, conv._parameters, "bias"))


def _config(conv: nn.Conv2d) -> tuple:
    return conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode


class PreparedConv:
    """One conv + eval-mode BN of a fused module, folded once: ``act(conv(x) + bias + residual)``."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, autotune: bool = False):
        self.sources = _sources(conv, bn)
        self.versions = tuple(None if t is None else t._version for t in self.sources)
        # (registry dict, name, tensor, version) of each source, for ``current``'s fast check.
        stores = (conv._parameters, bn._parameters, bn._parameters, bn._buffers, bn._buffers, conv._parameters)
        names = ("weight", "weight", "bias", "running_mean", "running_var", "bias")  # the last: the conv's
        self.guard = tuple(zip(stores, names, self.sources, self.versions))
        self.eps = bn.eps
        # The conv's settings folded in with it (conv_args below): one set on the module since (a
        # padding edited in place) must not leave the prepared conv computing the old conv.
        self.config = _config(conv)
        # Made outside inference_mode: an inference tensor could not be used later with autograd on.
        with torch.inference_mode(False), torch.no_grad():
            self.weight, self.bias = ops.fold_bn(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                 bn.eps, conv.bias)
            args = (self.weight, self.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            device = self.device_type = self.weight.device.type
            self.backend, prepack = _backend.select("prepack_conv", device, args)
            self.packed = prepack(*args)
            if autotune and self.packed is not None and hasattr(self.packed, "enable_autotune"):
                self.packed.enable_autotune(self._generic)
        self.fits: dict[tuple, bool] = {}  # input signature -> _fits, decided once per signature
        self.runs: dict[tuple, object] = {}  # input signature -> how __call__ runs it (usual state)
        self.conv_args = ([int(v) for v in conv.stride], [int(v) for v in conv.padding],
                          [int(v) for v in conv.dilation], int(conv.groups))

    def current(self, conv: nn.Conv2d, bn: nn.Module) -> bool:
        """Whether ``conv`` and ``bn`` still hold the tensors folded here, unchanged in place, with the
        same settings (BN's eps; the conv's stride, padding, dilation, groups, padding mode)."""
        if bn.eps != self.eps or _config(conv) != self.config:
            return False
        # The registry dicts read directly (getattr costs ~0.5 us a tensor, six a conv, every call);
        # where a module's dict is not the one prepared from, the general comparison. A source that
        # is not a registered tensor (a parametrization's property) reads as None here: not current.
        fast = conv._parameters is self.guard[0][0] and bn._parameters is self.guard[1][0] \
            and bn._buffers is self.guard[3][0]
        if fast:
            for store, name, then, version in self.guard:
                now = store.get(name)
                if now is not then or (now is not None and now._version != version):
                    return False
            return True
        for now, then, version in zip(_sources(conv, bn), self.sources, self.versions):
            if now is not then or (now is not None and now._version != version):
                return False
        return True

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, act: int) -> torch.Tensor:
        """``act(conv(x) + bias + residual)`` (``act``: an ``_activation`` code); called without autograd
        (``Preparable.prepared_convs``). How to run it is decided once per input signature (shapes,
        strides, dtypes, devices, activation) in the usual state (autograd off, the backend in force
        "auto" or the one prepared with, oneDNN enabled, no autocast): a small model at batch 1 spends
        as much host time on these calls as in its convolutions. Any other state takes ``_general``."""
        backend = _backend.in_force()
        if (backend == "auto" or backend == self.backend) and not torch.is_grad_enabled() \
                and torch._C._get_mkldnn_enabled() and not torch.is_autocast_enabled(self.device_type):
            if residual is None:
                key = (x.shape, x.stride(), x.dtype, x.device, act)
            else:
                key = (x.shape, x.stride(), x.dtype, x.device, act, residual.shape, residual.stride(), residual.dtype,
                       residual.device)
            run = self.runs.get(key)
            if run is None:
                if len(self.runs) >= 16:  # serving sees few input sizes; a stream of new ones starts over
                    self.runs.clear()
                run = self.runs[key] = self._runner(x, residual, act)
            return run(x, residual, act)
        return self._general(x, residual, act)

    def _runner(self, x: torch.Tensor, residual: torch.Tensor | None, act: int):
        """``run(x, residual, act)`` for this signature in the usual state: the prepacked form's route,
        or the op."""
        if self.packed is not None and self._fits(x, residual):
            route_for = getattr(self.packed, "route_for", None)
            if route_for is None:  # a prepacked form that decides on every call
                return self._general
            route = route_for(x, residual, act)
            if route is not None:
                return functools.partial(self._packed_route, route)
        return self._op if residual is None or residual.dtype == x.dtype else self._generic

    def _packed_route(self, route: str, x: torch.Tensor, residual: torch.Tensor | None, act: int) -> torch.Tensor:
        if _backend._traces:  # trace_dispatch is open
            _backend.record("conv_bias_act", self.backend)
        return self.packed._run(route, x, residual, act)

    def _op(self, x: torch.Tensor, residual: torch.Tensor | None, act: int) -> torch.Tensor:
        # The op itself (argument checks and backend choice in C++), not the functional layer: the
        # prepared weight and bias are already in the dtypes it takes.
        return _conv_bias_act(x, self.weight, self.bias, residual, *self.conv_args, act)

    def _general(self, x: torch.Tensor, residual: torch.Tensor | None, act: int) -> torch.Tensor:
        """``__call__`` in any state: the prepacked form where the backend in force and the input allow
        it (it returns None where it does not apply), else the op."""
        if (self.packed is not None and _backend.get_backend() in ("auto", self.backend)
                and self._fits_once(x, residual)):
            out = self.packed(x, residual, act)
            if out is not None:
                _backend.record("conv_bias_act", self.backend)
                return out
        return self._generic(x, residual, act)

    def _generic(self, x: torch.Tensor, residual: torch.Tensor | None, act: int) -> torch.Tensor:
        """The folded conv by the ``conv_bias_act`` op (what runs where the prepacked form does not)."""
        # The prepared weight's device type (x.device.type costs ~0.3 us; on another device the op raises).
        if torch.is_autocast_enabled(self.device_type) or (residual is not None and residual.dtype != x.dtype):
            stride, padding, dilation, groups = self.conv_args
            return ops.conv_bias_act(x, self.weight, self.bias, residual, stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, activation=act)
        return self._op(x, residual, act)

    def _fits_once(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        key = (x.shape, x.dtype, x.device)
        if residual is not None:
            key += (residual.shape, residual.dtype, residual.device)
        fits = self.fits.get(key)
        if fits is None:
            if len(self.fits) >= 16:  # serving sees few input sizes; a stream of new ones starts over
                self.fits.clear()
            fits = self.fits[key] = self._fits(x, residual)
        return fits

    def _fits(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """The op's checks that oneDNN's prepacked conv relies on (it may not bound its reads by
        them), and the dtype it was prepared for; what does not fit goes through the op, which
        says what is wrong."""
        if (x.dim() != 4 or x.dtype != self.weight.dtype or x.device != self.weight.device
                or x.shape[1] != self.weight.shape[1] * self.conv_args[3]):
            return False
        shape = conv_output_size(x.shape, self.weight.shape, *self.conv_args[:3])
        if shape[2] < 1 or shape[3] < 1:
            return False
        return residual is None or (
            residual.dtype == x.dtype and residual.device == x.device and list(residual.shape) == shape
        )


class Preparable(nn.Module):
    """Base of the fused modules that can be prepared: the prepared convs, in the order of
    :meth:`eval_pairs`, live in ``self._prepared`` (not a registered buffer: no ``state_dict``
    key) and everything that may change the tensors behind them drops them."""

    def eval_pairs(self) -> list[tuple[nn.Conv2d, nn.Module]]:
        """The (conv, BN) pairs this module folds in eval, in the order it runs them."""
        raise NotImplementedError

    def prepare_for_inference(self, autotune: bool = False) -> None:
        """Fold (and prepack) every conv+BN of this module now; see :func:`prepare_for_inference`."""
        pairs = self.eval_pairs()
        if any(ops.uses_batch_stats(False, bn.running_mean, bn.running_var) for _, bn in pairs):
            # A BN that keeps no running statistics normalises with the batch's in eval too: there is
            # nothing to fold (folding crashed on its None buffers); the module runs unprepared.
            self.drop_prepared()
            return
        self.__dict__["_prepared"] = [PreparedConv(conv, bn, autotune) for conv, bn in pairs]

    def prepared_convs(self, pairs: list | None = None) -> list[PreparedConv] | None:
        """The prepared convs if they may serve this call (eager, no autograd, nothing changed);
        ``pairs``: :meth:`eval_pairs` when the caller has them already."""
        prepared = self.__dict__.get("_prepared")
        if prepared is None or torch.is_grad_enabled() or emits_aten():
            return None
        if pairs is None:
            pairs = self.eval_pairs()
        if len(pairs) == len(prepared):
            for p, (c, b) in zip(prepared, pairs):  # a loop, not all(<generator>): ~0.5 us less, every call
                if not p.current(c, b):
                    break
            else:
                return prepared
        self.__dict__.pop("_prepared")
        warnings.warn(
            f"fused_resnet: a parameter, BN buffer or conv setting of this {type(self).__name__} changed since "
            "prepare_for_inference(); it runs unprepared (folding on every call) until prepared again",
            stacklevel=3,
        )
        return None

    def drop_prepared(self) -> None:
        self.__dict__.pop("_prepared", None)

    def train(self, mode: bool = True):
        if mode:
            self.drop_prepared()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.drop_prepared()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.drop_prepared()
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        if "_prepared" in state:
            state = dict(state)
            del state["_prepared"]
        return state


def all_eval(chain, ds) -> bool:
    """Whether every BN of a prepared block normalises with its running statistics (the preparation's
    guard has checked that they are the tensors it folded)."""
    for _, bn in chain:
        if bn.training:
            return False
    return ds is None or not ds[1].training


def serve_block(x: torch.Tensor, prepared: list, has_ds: bool, downsample: nn.Module | None, act: int) -> torch.Tensor:
    """A prepared block's eval forward (``modules._folded_residual_forward`` without a gate, in fewer calls: a
    small model at batch 1 spends as much host time in the block's Python as in its convolutions):
    the shortcut (the folded downsample, or the input, or another downsample module), then the chain,
    its last conv adding the shortcut before the activation."""
    if has_ds:
        shortcut, convs = prepared[0](x, None, _activation.NONE), prepared[1:]
    else:
        shortcut, convs = (x if downsample is None else downsample(x)), prepared
    h, last = x, len(convs) - 1
    for i, conv in enumerate(convs):
        h = conv(h, shortcut if i == last else None, act)
    return h


def emits_aten() -> bool:
    """Whether a fused module should emit plain ATen ops rather than ours: under ``torch.compile``
    and ``torch.export`` (dynamo) and ``torch.jit.trace`` / the TorchScript-based ONNX exporter,
    in eval, so that compilers fuse and exporters understand the model."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def prepare_for_inference(model: nn.Module, autotune: bool = False) -> nn.Module:
    """Put ``model`` in eval mode and fold every fused BN into its conv once (prepacking the
    weights where the backend in force can, e.g. for oneDNN on the CPU in float32), so that serving
    forwards (``no_grad`` / ``inference_mode``) cost only the convolutions. Returns ``model``.

    ``autotune``: where a backend has several ways to run a folded conv (the native CPU backend:
    oneDNN's prepacked conv, ATen's conv, the op), time them on the first call with each input size
    and keep the fastest, instead of a fixed rule of thumb; as ``torch.backends.cudnn.benchmark``, the
    first call of each size is slower and the choice (so the outputs' last bits) may vary from one
    process to the next. Off by default.

    An explicit step: call it again after changing parameters or BN buffers yourself. What drops
    the preparation, and the guard against changes it cannot see, are in this module's docstring.
    Modules that are not fused are left alone."""
    model.eval()
    for module in model.modules():
        if isinstance(module, Preparable):
            module.prepare_for_inference(autotune=autotune)
    return model
