"""The Triton implicit-GEMM convolutions (``backends/triton/_conv_gemm*.py``) against ``fused_resnet.reference``.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1``): shapes are tiny because the interpreter pays per program and per operation.
With a GPU the same tests run on CUDA tensors, and the ``cuda``-marked tests add bf16, realistic ResNet
shapes, every shipped autotuning config and CUDA-graph capture; without one, test_kernels_compile_for_sm90
compiles every kernel variant for an H100 with the real compiler (the interpreter accepts code it rejects).
Every output the kernels allocate is poisoned with NaN first (the ``_poison`` fixture), so an element a
kernel forgets to write fails.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

pytest.importorskip("triton")

from fused_resnet import reference
from fused_resnet._tolerances import assert_close, tolerance
from fused_resnet.backends.triton import _conv_gemm as cg
from fused_resnet.backends.triton import _conv_gemm_backward as cgb
from fused_resnet.backends.triton import _conv_gemm_common as common
from fused_resnet.backends.triton import _conv_gemm_wgrad as cgw

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ONE = (1, 1)
_EMPTY = torch.empty  # unpoisoned, for the lazily backed huge storages


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every floating tensor allocated through torch.empty/empty_like/new_empty starts as NaN."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: nan(new_empty(self, *a, **k)))


@pytest.fixture(autouse=True)
def _one_config_on_gpu(request):
    """On a GPU the small shapes of the unmarked tests run one config each (autotuning every one of
    them would cost minutes of compiles); the cuda-marked tests choose their configs themselves."""
    if DEV != "cuda" or request.node.get_closest_marker("cuda") is not None:
        yield
        return
    with _forced(_SMALL_CONFIGS):
        yield


# One modest config per kernel (the wgrad kernel has no GROUP_M): fits every dtype, fp32 on FMA units too.
_SMALL_CONFIGS = {"fwd": common.make_config(64, 64, 32, 4, 3, GROUP_M=8),
                  "dgrad": common.make_config(64, 64, 32, 4, 3, GROUP_M=8),
                  "wgrad": common.make_config(64, 64, 32, 4, 3)}


@contextlib.contextmanager
def _forced(configs):
    with contextlib.ExitStack() as stack:
        for name, config in configs.items():
            stack.enter_context(common.forced_config(name, config))
        yield


@pytest.fixture(autouse=True)
def _strict_fp32():
    """fp32 comparisons at the fp32 tolerance: no TF32 in the kernels nor in cuDNN's reference."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def _act(shape, dtype, channels_last, device=DEV):
    x = torch.randn(shape, device=device).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _vec(c, positive=False, device=DEV):
    v = torch.rand(c, device=device) + 0.5 if positive else torch.randn(c, device=device)
    return v


def _check_all(got, want, dtype, names):
    assert len(got) == len(want)
    for g, w, name in zip(got, want, names):
        if w is None:
            assert g is None, f"{name}: expected None"
            continue
        assert g is not None, f"{name}: missing"
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} vs {w.dtype}"
        if g.dim() == 4 and not name.startswith("grad_w"):  # activations follow _layout's rule
            assert g.stride() == w.stride() or g.shape[1] == 1, f"{name}: strides {g.stride()} vs {w.stride()}"
        assert_close(g, w, dtype, name=name)


# (kernel, stride, padding, C_in, C_out, H, W, N): 1x1/3x3/7x7, stride 1/2, odd sizes, channels not
# multiples of the tiles; the 7x7 case is the ResNet stem's (3 input channels).
CONV_SHAPES = [
    (1, 1, 0, 5, 20, 5, 7, 2),
    (3, 1, 1, 6, 20, 7, 5, 2),
    (3, 2, 1, 5, 12, 7, 6, 2),
    (1, 2, 0, 6, 10, 7, 7, 2),
    (7, 2, 3, 3, 8, 7, 6, 1),
]
SHAPE_IDS = [f"k{k}s{s}" for k, s, *_ in CONV_SHAPES]


def _conv_args(shape, dtype, channels_last):
    k, s, p, c_in, c_out, h, w, n = shape
    x = _act((n, c_in, h, w), dtype, channels_last)
    weight = torch.randn(c_out, c_in, k, k, device=DEV).to(dtype) * (1.0 / (c_in * k * k) ** 0.5)
    if channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    return x, weight, (s, s), (p, p)


# ---- forward ----------------------------------------------------------------------------------------------

PROLOGUES = {"none": (False, False, False), "bn_relu": (True, True, True), "shift_relu": (False, True, True),
             "scale": (True, False, False)}


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype, channels_last, prologue",
                         [(torch.float32, False, "bn_relu"), (torch.float16, True, "bn_relu"),
                          (torch.float32, True, "none")])
def test_conv_stats(shape, dtype, channels_last, prologue):
    x, weight, stride, padding = _conv_args(shape, dtype, channels_last)
    has_scale, has_shift, relu = PROLOGUES[prologue]
    scale = _vec(x.shape[1], positive=True) if has_scale else None
    shift = _vec(x.shape[1]) if has_shift else None
    args = (x, scale, shift, relu, weight, stride, padding, ONE, 1)
    assert cg.supports_conv_stats(*args)
    _check_all(cg.conv_stats(*args), reference.conv_stats(*args), dtype, ("y", "mean", "var"))


@pytest.mark.parametrize("prologue", ["shift_relu", "scale"])
def test_conv_stats_partial_prologue(prologue):
    x, weight, stride, padding = _conv_args(CONV_SHAPES[1], torch.float16, False)
    has_scale, has_shift, relu = PROLOGUES[prologue]
    args = (x, _vec(6, True) if has_scale else None, _vec(6) if has_shift else None, relu, weight, stride, padding,
            ONE, 1)
    _check_all(cg.conv_stats(*args), reference.conv_stats(*args), torch.float16, ("y", "mean", "var"))


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype, channels_last, bias, residual, relu",
                         [(torch.float32, True, True, True, True), (torch.float16, False, True, False, True),
                          (torch.float32, False, False, True, False)])
def test_conv_bias_act(shape, dtype, channels_last, bias, residual, relu):
    x, weight, stride, padding = _conv_args(shape, dtype, channels_last)
    out_shape = reference.conv_bias_act(x, weight, None, None, stride, padding, ONE, 1, False).shape
    b = _vec(weight.shape[0]) if bias else None
    # The residual's layout need not match the input's.
    r = _act(out_shape, dtype, not channels_last) if residual else None
    args = (x, weight, b, r, stride, padding, ONE, 1, relu)
    assert cg.supports_conv_bias_act(*args)
    _check_all((cg.conv_bias_act(*args),), (reference.conv_bias_act(*args),), dtype, ("out",))


def test_conv_bias_act_batch_of_one_fp16():
    x, weight, stride, padding = _conv_args((3, 1, 1, 7, 9, 5, 5, 1), torch.float16, True)
    args = (x, weight, _vec(9), _act((1, 9, 5, 5), torch.float16, True), stride, padding, ONE, 1, True)
    _check_all((cg.conv_bias_act(*args),), (reference.conv_bias_act(*args),), torch.float16, ("out",))


def test_small_tiles_many_programs():
    """A forced small config: several row, channel and K blocks per conv, and STATS_ROWS blocks per tile."""
    x, weight, stride, padding = _conv_args((3, 1, 1, 20, 40, 6, 5, 2), torch.float32, True)
    args = (x, _vec(20, True), _vec(20), True, weight, stride, padding, ONE, 1)
    with common.forced_config("fwd", common.make_config(32, 16, 16, 4, 1, GROUP_M=2)):
        got = cg.conv_stats(*args)
    _check_all(got, reference.conv_stats(*args), torch.float32, ("y", "mean", "var"))


# ---- backward ---------------------------------------------------------------------------------------------


def _stats_backward_args(shape, dtype, channels_last, prologue):
    x, weight, stride, padding = _conv_args(shape, dtype, channels_last)
    has_scale, has_shift, relu = PROLOGUES[prologue]
    scale = _vec(x.shape[1], positive=True) if has_scale else None
    shift = _vec(x.shape[1]) if has_shift else None
    y, mean, _ = reference.conv_stats(x, scale, shift, relu, weight, stride, padding, ONE, 1)
    # grad_y in the other layout: autograd does not promise the forward's.
    grad_y = _act(y.shape, dtype, not channels_last)
    c_out = weight.shape[0]
    return (grad_y, _vec(c_out), _vec(c_out), x, scale, shift, relu, weight, y, mean, stride, padding, ONE, 1)


STATS_MASKS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]


@pytest.mark.parametrize("shape", CONV_SHAPES[:4], ids=SHAPE_IDS[:4])
@pytest.mark.parametrize("dtype, channels_last, prologue",
                         [(torch.float32, True, "bn_relu"), (torch.float16, False, "bn_relu"),
                          (torch.float32, False, "none")])
def test_conv_stats_backward(shape, dtype, channels_last, prologue):
    args = _stats_backward_args(shape, dtype, channels_last, prologue)
    mask = (True, True, True)
    assert cgb.supports_conv_stats_backward(*args, mask)
    _check_all(cgb.conv_stats_backward(*args, mask), reference.conv_stats_backward(*args, mask), dtype,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))


@pytest.mark.parametrize("mask", STATS_MASKS[1:], ids=["x", "affine", "w"])
@pytest.mark.parametrize("prologue", ["bn_relu", "shift_relu", "scale"])
def test_conv_stats_backward_masks(mask, prologue):
    args = _stats_backward_args(CONV_SHAPES[2], torch.float32, True, prologue)
    _check_all(cgb.conv_stats_backward(*args, mask), reference.conv_stats_backward(*args, mask), torch.float32,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))


def test_conv_stats_backward_stem():
    args = _stats_backward_args(CONV_SHAPES[4], torch.float32, True, "none")
    mask = (True, False, True)
    _check_all(cgb.conv_stats_backward(*args, mask), reference.conv_stats_backward(*args, mask), torch.float32,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))


def test_few_input_channels_flat_k():
    """3 input channels: (tap, channel) flattened into the forward's K and the wgrad's N, bias fused."""
    x, weight, stride, padding = _conv_args((3, 1, 1, 3, 10, 6, 5, 2), torch.float16, True)
    args = (x, weight, _vec(10), None, stride, padding, ONE, 1, True)
    assert common.flat_k(3, weight)
    out = cg.conv_bias_act(*args)
    _check_all((out,), (reference.conv_bias_act(*args),), torch.float16, ("out",))
    bwd = (_act(out.shape, torch.float16, True), x, weight, out, True, stride, padding, ONE, 1, (True, True, True, False))
    _check_all(cgb.conv_bias_act_backward(*bwd), reference.conv_bias_act_backward(*bwd), torch.float16,
               ("grad_x", "grad_w", "grad_bias", "grad_residual"))


def test_wgrad_split_and_tiny_phase():
    """Many pixels per output channel: the wgrad reduction is split over programs. Stride 3 on a width
    of 2 leaves the phase w % 3 == 2 empty."""
    args = _stats_backward_args((1, 1, 0, 6, 10, 12, 12, 2), torch.float32, False, "bn_relu")
    assert cgw._wgrad_split(288, 10, 6, 1, torch.device(DEV)) < 288 or DEV == "cuda"
    _check_all(cgb.conv_stats_backward(*args, (True, True, True)),
               reference.conv_stats_backward(*args, (True, True, True)), torch.float32,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))
    args = _stats_backward_args((3, 3, 1, 4, 6, 5, 2, 1), torch.float32, True, "bn_relu")
    _check_all(cgb.conv_stats_backward(*args, (True, True, True)),
               reference.conv_stats_backward(*args, (True, True, True)), torch.float32,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))


@pytest.mark.parametrize("kernel, stride, padding", [((3, 1), (2, 1), (1, 0)), ((5, 5), (3, 2), (2, 3)),
                                                     ((1, 3), (1, 3), (0, 2))], ids=["3x1", "5x5", "1x3"])
def test_rectangular_kernels_strides_paddings(kernel, stride, padding):
    """Beyond ResNet's convs: non-square kernels, strides and paddings (padding up to the kernel size)."""
    x = _act((2, 5, 8, 7), torch.float32, True)
    weight = torch.randn(9, 5, *kernel, device=DEV) * 0.2
    fwd = (x, _vec(5, True), _vec(5), True, weight, stride, padding, ONE, 1)
    _check_all(cg.conv_stats(*fwd), reference.conv_stats(*fwd), torch.float32, ("y", "mean", "var"))
    y, mean, _ = reference.conv_stats(*fwd)
    bwd = (_act(y.shape, torch.float32, False), _vec(9), _vec(9), *fwd[:5], y, mean, stride, padding, ONE, 1)
    mask = (True, True, True)
    _check_all(cgb.conv_stats_backward(*bwd, mask), reference.conv_stats_backward(*bwd, mask), torch.float32,
               ("grad_x", "grad_scale", "grad_shift", "grad_w"))


BIAS_MASKS = [(True, True, True, True), (True, True, True, False), (False, False, True, False),
              (True, False, False, True), (False, True, False, False)]


@pytest.mark.parametrize("mask", BIAS_MASKS, ids=["all", "no_res", "bias_only", "x_res", "w_only"])
@pytest.mark.parametrize("shape, dtype, channels_last, relu",
                         [(CONV_SHAPES[1], torch.float32, True, True), (CONV_SHAPES[2], torch.float16, False, True),
                          (CONV_SHAPES[3], torch.float32, False, False)], ids=["k3s1", "k3s2", "k1s2"])
def test_conv_bias_act_backward(mask, shape, dtype, channels_last, relu):
    x, weight, stride, padding = _conv_args(shape, dtype, channels_last)
    out = reference.conv_bias_act(x, weight, _vec(weight.shape[0]), None, stride, padding, ONE, 1, relu)
    grad_out = _act(out.shape, dtype, not channels_last)
    args = (grad_out, x, weight, out, relu, stride, padding, ONE, 1, mask)
    assert cgb.supports_conv_bias_act_backward(*args)
    _check_all(cgb.conv_bias_act_backward(*args), reference.conv_bias_act_backward(*args), dtype,
               ("grad_x", "grad_w", "grad_bias", "grad_residual"))


# ---- what the kernels decline, and 64-bit offsets -------------------------------------------------------


def test_supports_declines_what_the_reference_must_do():
    x, weight, stride, padding = _conv_args(CONV_SHAPES[1], torch.float32, False)
    assert cg.supports_conv(x, weight, stride, padding, ONE, 1)
    assert not cg.supports_conv(x, weight, stride, padding, (2, 2), 1)
    assert not cg.supports_conv(x[:, :4], weight[:, :2], stride, padding, ONE, 2)
    assert not cg.supports_conv(x.double(), weight.double(), stride, padding, ONE, 1)
    if DEV == "cpu":  # the interpreter's bf16 tl.dot is wrong
        assert not cg.supports_conv(x.bfloat16(), weight.bfloat16(), stride, padding, ONE, 1)


def _huge_stride_view(shape, dtype, huge_dim):
    """A ``shape`` view whose ``huge_dim`` index times its stride passes 2**31 elements; the other
    dims are laid out channels_last below it. The storage is reserved (virtual memory) but only the
    touched pages are ever backed by memory."""
    strides = [0] * 4
    extent = 1
    for d in (1, 3, 2, 0):
        if d != huge_dim:
            strides[d] = extent
            extent *= shape[d]
    strides[huge_dim] = max(2**31 // (shape[huge_dim] - 1) + 1, extent)
    storage = _EMPTY((shape[huge_dim] - 1) * strides[huge_dim] + extent, dtype=dtype, device=DEV)
    view = storage.as_strided(shape, strides)
    view.copy_(torch.randn(shape, device=DEV))
    return view


def test_int64_offsets():
    """Offsets past 2**31 elements in every activation the kernels read (inputs, residual, gradient)."""
    x = _huge_stride_view((2, 3, 5, 4), torch.float16, huge_dim=2)
    weight = torch.randn(6, 3, 3, 3, device=DEV).half()
    residual = _huge_stride_view((2, 6, 5, 4), torch.float16, huge_dim=1)
    args = (x, weight, _vec(6), residual, ONE, ONE, ONE, 1, True)
    _check_all((cg.conv_bias_act(*args),), (reference.conv_bias_act(*args),), torch.float16, ("out",))
    args = (x, _vec(3, True), _vec(3), True, weight, ONE, ONE, ONE, 1)
    _check_all(cg.conv_stats(*args), reference.conv_stats(*args), torch.float16, ("y", "mean", "var"))
    out = reference.conv_bias_act(x, weight, None, None, ONE, ONE, ONE, 1, True)
    grad_out = _huge_stride_view(tuple(out.shape), torch.float16, huge_dim=0)
    args = (grad_out, x, weight, out, True, ONE, ONE, ONE, 1, (True, True, True, False))
    _check_all(cgb.conv_bias_act_backward(*args), reference.conv_bias_act_backward(*args), torch.float16,
               ("grad_x", "grad_w", "grad_bias", "grad_residual"))


# ---- GPU only: bf16, TF32, realistic ResNet shapes, every config, CUDA graphs -----------------------------

# (kernel, stride, padding, C_in, C_out, H, W, N) of ResNet-50 at 224x224 (batch cut to keep it quick).
RESNET_SHAPES = [
    (7, 2, 3, 3, 64, 224, 224, 8),
    (1, 1, 0, 64, 256, 56, 56, 8),
    (3, 1, 1, 64, 64, 56, 56, 8),
    (3, 2, 1, 128, 128, 56, 56, 8),
    (1, 2, 0, 256, 512, 56, 56, 8),
    (3, 1, 1, 512, 512, 7, 7, 8),
    (1, 1, 0, 2048, 512, 7, 7, 8),
]


def _cuda_case(shape, dtype, channels_last):
    x, weight, stride, padding = _conv_args(shape, dtype, channels_last)
    c_in = x.shape[1]
    fwd = (x, _vec(c_in, True), _vec(c_in), True, weight, stride, padding, ONE, 1)
    y, mean, _ = reference.conv_stats(*fwd)
    c_out = weight.shape[0]
    bwd = (torch.randn_like(y), _vec(c_out), _vec(c_out), *fwd[:5], y, mean, stride, padding, ONE, 1)
    return fwd, bwd


def _one_config_per_kernel(dtype):
    """Skip autotuning (minutes of compiles for every shape and dtype): one config per kernel, the first
    shipped one for 16-bit types; the autotuned path runs in test_cuda_graph_capture_cuda, every config in
    test_every_config_cuda. fp32 without TF32 runs on FMA units, whose large tiles do not fit."""
    if dtype == torch.float32:
        return _forced(_SMALL_CONFIGS)
    return _forced({"fwd": cg.GPU_FWD_CONFIGS[0], "dgrad": cgb.GPU_DGRAD_CONFIGS[0], "wgrad": cgw.GPU_WGRAD_CONFIGS[0]})


@pytest.mark.cuda
@pytest.mark.parametrize("shape", RESNET_SHAPES, ids=[f"k{s[0]}s{s[1]}c{s[3]}-{s[4]}h{s[5]}" for s in RESNET_SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_resnet_shapes_cuda(shape, dtype):
    with _one_config_per_kernel(dtype):
        _check_resnet_shape(shape, dtype)


def _check_resnet_shape(shape, dtype):
    for channels_last in (True, False):
        fwd, bwd = _cuda_case(shape, dtype, channels_last)
        _check_all(cg.conv_stats(*fwd), reference.conv_stats(*fwd), dtype, ("y", "mean", "var"))
        mask = (True, True, True)
        _check_all(cgb.conv_stats_backward(*bwd, mask), reference.conv_stats_backward(*bwd, mask), dtype,
                   ("grad_x", "grad_scale", "grad_shift", "grad_w"))
        x, weight, stride, padding = fwd[0], fwd[4], fwd[5], fwd[6]
        out_shape = bwd[0].shape
        cba = (x, weight, _vec(weight.shape[0]), _act(out_shape, dtype, channels_last), stride, padding, ONE, 1, True)
        out = reference.conv_bias_act(*cba)
        _check_all((cg.conv_bias_act(*cba),), (out,), dtype, ("out",))
        cbb = (torch.randn_like(out), x, weight, out, True, stride, padding, ONE, 1, (True, True, True, True))
        _check_all(cgb.conv_bias_act_backward(*cbb), reference.conv_bias_act_backward(*cbb), dtype,
                   ("grad_x", "grad_w", "grad_bias", "grad_residual"))


@pytest.mark.cuda
def test_tf32_follows_cudnn_setting_cuda():
    fwd, _ = _cuda_case(RESNET_SHAPES[2], torch.float32, True)
    torch.backends.cudnn.allow_tf32 = True
    assert common.dot_precision(fwd[0]) == "tf32"
    got = cg.conv_stats(*fwd)
    want = reference.conv_stats(*(t.double() if isinstance(t, torch.Tensor) else t for t in fwd))
    for g, w, name in zip(got, want, ("y", "mean", "var")):
        assert_close(g, w, tol=tolerance(torch.float32, tf32=True), name=name)
    torch.backends.cudnn.allow_tf32 = False
    assert common.dot_precision(fwd[0]) == "ieee"


# Shapes for the per-config check: channels not multiples of any tile, stride 1 and 2.
CONFIG_SHAPES = [(3, 1, 1, 96, 80, 15, 13, 4), (3, 2, 1, 72, 136, 17, 19, 2)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_config_cuda(dtype):
    """Each shipped config of each kernel, forced, against the reference (8-warp conv loops have been
    miscompiled by some Triton versions: the autotuner must never be able to pick a wrong one). A config
    the compiler finds too big for shared memory is one the autotuner skips too."""
    from triton.runtime.errors import OutOfResources

    kernels = {"fwd": cg.GPU_FWD_CONFIGS, "dgrad": cgb.GPU_DGRAD_CONFIGS, "wgrad": cgw.GPU_WGRAD_CONFIGS}
    checked, too_big = 0, []
    for (name, configs), shape in itertools.product(kernels.items(), CONFIG_SHAPES):
        fwd, bwd = _cuda_case(shape, dtype, channels_last=True)
        for config in configs:
            try:
                with common.forced_config(name, config):
                    if name == "fwd":
                        _check_all(cg.conv_stats(*fwd), reference.conv_stats(*fwd), dtype,
                                   (f"y {config}", "mean", "var"))
                    else:
                        mask = (True, True, False) if name == "dgrad" else (False, False, True)
                        _check_all(cgb.conv_stats_backward(*bwd, mask), reference.conv_stats_backward(*bwd, mask),
                                   dtype, (f"grad_x {config}", "grad_scale", "grad_shift", f"grad_w {config}"))
            except OutOfResources:
                too_big.append((name, str(config)))
                continue
            checked += 1
    assert checked >= 0.8 * sum(len(c) for c in kernels.values()) * len(CONFIG_SHAPES), too_big


@pytest.mark.cuda
def test_cuda_graph_capture_cuda():
    """No host sync, no data-dependent allocation: the forward and backward replay from a CUDA graph."""
    fwd, bwd = _cuda_case(RESNET_SHAPES[2], torch.float16, True)
    mask = (True, True, True)
    cg.conv_stats(*fwd)  # autotune before capture
    cgb.conv_stats_backward(*bwd, mask)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = (*cg.conv_stats(*fwd), *cgb.conv_stats_backward(*bwd, mask))
    fwd[0].copy_(torch.randn_like(fwd[0]))
    graph.replay()
    want = (*reference.conv_stats(*fwd), *reference.conv_stats_backward(*bwd, mask))
    for g, w in zip(outs, want):
        assert_close(g, w, torch.float16)


# ---- CPU only: the kernels compile for an H100 (sm_90) with the real Triton compiler --------------------

_AOT_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from fused_resnet.backends.triton import _conv_gemm as cg, _conv_gemm_backward as cgb, _conv_gemm_wgrad as cgw

launches = []
class Recorded(Exception):
    pass
def record(name, jit_fn, tuned_fn, interpreter_config, grid, *args, **kwargs):
    launches.append((name, jit_fn, args, kwargs))
    raise Recorded  # one launch per call: what follows it (e.g. combine_partial_stats) needs a GPU
cg.launch = cgb.launch = cgw.launch = record
cg.dot_precision = cgb.dot_precision = cgw.dot_precision = lambda x: "tf32" if x.dtype == torch.float32 else "ieee"
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

def specialise(fn, args, kwargs, config):
    # What triton.jit does at launch: ints equal to 1 become constants, multiples of 16 and pointers
    # get a divisibility hint (channels_last strides are multiples of 16 for ResNet widths).
    values = dict(zip(fn.arg_names, args), **kwargs, **config.kwargs)
    signature, constants, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = values[name]
        if param.is_constexpr or (type(v) is int and v == 1):
            signature[name], constants[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name], attrs[(i,)] = "*" + TYPES[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if abs(v) < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constants, attrs)

def calls(dtype, k, s, c_in):
    x = torch.randn(2, c_in, 8, 8).to(dtype).to(memory_format=torch.channels_last)
    w = torch.randn(64, c_in, k, k).to(dtype).to(memory_format=torch.channels_last)
    y = torch.randn(2, 64, 8 // s, 8 // s).to(dtype).to(memory_format=torch.channels_last)
    sc, v = torch.rand(c_in), torch.rand(64)
    st, pad, one = (s, s), (k // 2, k // 2), (1, 1)
    yield lambda: cg.conv_stats(x, sc, sc, True, w, st, pad, one, 1)
    yield lambda: cg.conv_bias_act(x, w, v, y, st, pad, one, 1, True)
    yield lambda: cgb.conv_stats_backward(y, v, v, x, sc, sc, True, w, y, v, st, pad, one, 1, (True, True, False))
    yield lambda: cgb.conv_stats_backward(y, v, v, x, sc, sc, True, w, y, v, st, pad, one, 1, (False, False, True))
    yield lambda: cgb.conv_bias_act_backward(y, x, w, y, True, st, pad, one, 1, (True, False, False, False))
    yield lambda: cgb.conv_bias_act_backward(y, x, w, y, True, st, pad, one, 1, (False, True, True, False))

# (dtype, kernel, stride, C_in, which calls): every kernel and epilogue once, the others' dtypes and
# the flat (stem) variants where they change the code.
for dtype, k, s, c_in, which in [(torch.float16, 3, 2, 64, range(6)), (torch.bfloat16, 1, 1, 64, (0, 3)),
                                 (torch.float32, 3, 1, 64, (0,)), (torch.float16, 7, 2, 3, (0, 3))]:
    for i, call in enumerate(calls(dtype, k, s, c_in)):
        try:
            if i in which:
                call()
        except Recorded:
            pass
configs = {"fwd": cg.GPU_FWD_CONFIGS, "dgrad": cgb.GPU_DGRAD_CONFIGS, "wgrad": cgw.GPU_WGRAD_CONFIGS}
for name, fn, args, kwargs in launches:
    config = configs[name][0]
    compile(specialise(fn, args, kwargs, config), target=GPUTarget("cuda", 90, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages})
print("compiled", len(launches))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the CUDA tests compile every config for real")
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects: compile each kernel variant (fp16/bf16/TF32,
    1x1/3x3/7x7-stem, stride 1/2, every epilogue) for sm_90 with Triton's compiler and ptxas."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split()[-1] == "11", done.stdout
