"""The Triton implicit-GEMM convolutions at GPU scale: on a GPU, bf16, TF32, realistic ResNet shapes, every
shipped autotuning config and CUDA-graph capture; without one, every kernel variant compiled for sm_90."""

from __future__ import annotations

import itertools

import pytest
import torch
from _conv_gemm_cases import (
    _SMALL_CONFIGS,
    ONE,
    _act,
    _check_all,
    _conv_args,
    _forced,
    _one_config_on_gpu,  # noqa: F401  (autouse fixture)
    _poison,  # noqa: F401  (autouse fixture)
    _strict_fp32,  # noqa: F401  (autouse fixture)
    _vec,
)

from fused_resnet import reference
from fused_resnet._tolerances import assert_close, tolerance
from fused_resnet.backends.triton import _conv_gemm as cg
from fused_resnet.backends.triton import _conv_gemm_backward as cgb
from fused_resnet.backends.triton import _conv_gemm_common as common
from fused_resnet.backends.triton import _conv_gemm_wgrad as cgw

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
