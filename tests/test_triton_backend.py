"""The ``triton`` backend's kernels against the reference, one kernel at a time.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``conftest`` sets
``TRITON_INTERPRET=1``), in fp32 and fp16; bf16 and the real compiled kernels run in the
``cuda``-marked tests. Every call goes through the registered op under ``use_backend("triton")``
and ``trace_dispatch()`` proves the Triton kernel ran; every allocation the kernels make is
poisoned with NaN first, so an element left unwritten fails.
"""

from __future__ import annotations

import pytest
import torch

import fused_resnet
from fused_resnet import reference
from fused_resnet._tolerances import assert_close

triton = pytest.importorskip("triton")
from fused_resnet.backends.triton import _choice, _stats, _tiling

ops = torch.ops.fused_resnet
if _tiling.INTERPRETED:
    DEVICES = [pytest.param("cpu", id="interp")]
else:
    DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# (N, C_in, H, W, C_out, k, stride, pad): odd sizes, stride 2, 70 output channels (more than one
# 64-channel block), a 1x1 strided conv; N=1 for the eval-mode (conv_bias_act) case.
CONVS = {
    "3x3s1_odd": (2, 5, 9, 7, 70, 3, 1, 1),
    "3x3s2": (2, 6, 11, 10, 12, 3, 2, 1),
    "1x1s2": (3, 8, 7, 9, 10, 1, 2, 0),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every tensor allocated with torch.empty/empty_like during a test starts as NaN (or -1)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


def _act(shape, dtype, layout, device, offset=0.0):
    return (torch.randn(shape, device=device) + offset).to(dtype).contiguous(memory_format=LAYOUTS[layout])


def _vec(c, device, positive=False):
    v = torch.randn(c, device=device)
    return v.abs() + 0.5 if positive else v


def _run(kernel, *args):
    with fused_resnet.use_backend("triton"), fused_resnet.trace_dispatch() as log:
        out = getattr(ops, kernel)(*args)
    assert (kernel, "triton") in log, log
    return out if isinstance(out, (tuple, list)) else (out,)


def _compare(outs, refs, dtype, names):
    for out, ref, name in zip(outs, refs, names):
        if ref is None:
            assert out.numel() == 0, f"{name}: computed but not asked for"
            continue
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        if out.dim() == 4:
            assert out.stride() == ref.stride(), f"{name}: layout {out.stride()} vs {ref.stride()}"
        assert_close(out, ref, dtype, name=name)


def _conv_args(case, dtype, layout, device, prologue=True, relu=True):
    n, cin, h, w, cout, k, s, p = CONVS[case]
    x = _act((n, cin, h, w), dtype, layout, device)
    weight = (torch.randn(cout, cin, k, k, device=device) / (cin * k * k) ** 0.5).to(dtype)
    scale = _vec(cin, device, positive=True) if prologue else None
    shift = _vec(cin, device) if prologue else None
    return x, scale, shift, relu and prologue, weight, [s, s], [p, p], [1, 1], 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONVS)
def test_conv_stats(case, dtype, layout, device):
    prologue = case != "1x1s2"
    args = _conv_args(case, dtype, layout, device, prologue=prologue)
    _compare(_run("conv_stats", *args), reference.conv_stats(*args), dtype, ("y", "mean", "var"))

    y, mean, _ = reference.conv_stats(*args)
    grads = (torch.randn_like(y), _vec(y.shape[1], device), _vec(y.shape[1], device))
    x, scale, shift, in_relu, weight, *conv = args
    for mask in ([True, True, True], [False, True, False], [True, False, True]):
        bargs = (*grads, x, scale, shift, in_relu, weight, y, mean, *conv, mask)
        _compare(_run("conv_stats_backward", *bargs), reference.conv_stats_backward(*bargs), dtype,
                 ("grad_x", "grad_scale", "grad_shift", "grad_w"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_stats_scale_only_prologue_and_mixed_layout_grad(layout, device):
    """A prologue without shift or ReLU, and an incoming gradient in the other layout."""
    x, scale, _, _, weight, *conv = _conv_args("3x3s1_odd", torch.float32, layout, device)
    args = (x, scale, None, False, weight, *conv)
    _compare(_run("conv_stats", *args), reference.conv_stats(*args), torch.float32, ("y", "mean", "var"))
    y, mean, _ = reference.conv_stats(*args)
    other = "nchw" if layout == "nhwc" else "nhwc"
    grad_y = torch.randn_like(y).contiguous(memory_format=LAYOUTS[other])
    bargs = (grad_y, _vec(y.shape[1], device), _vec(y.shape[1], device), x, scale, None, False, weight, y, mean,
             *conv, [True, True, True])
    _compare(_run("conv_stats_backward", *bargs), reference.conv_stats_backward(*bargs), torch.float32,
             ("grad_x", "grad_scale", "grad_shift", "grad_w"))


@pytest.mark.parametrize("device", DEVICES)
def test_conv_stats_groups_dilation(device):
    """Grouped, dilated convs (ResNeXt, dilated ResNets) go through torch's conv unchanged."""
    x = _act((2, 8, 9, 9), torch.float32, "nhwc", device)
    weight = torch.randn(12, 4, 3, 3, device=device) / 6.0
    args = (x, _vec(8, device, True), _vec(8, device), True, weight, [1, 1], [2, 2], [2, 2], 2)
    _compare(_run("conv_stats", *args), reference.conv_stats(*args), torch.float32, ("y", "mean", "var"))
    y, mean, _ = reference.conv_stats(*args)
    bargs = (torch.randn_like(y), _vec(12, device), _vec(12, device), *args[:5], y, mean, *args[5:], [True] * 3)
    _compare(_run("conv_stats_backward", *bargs), reference.conv_stats_backward(*bargs), torch.float32,
             ("grad_x", "grad_scale", "grad_shift", "grad_w"))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_repeat(device):
    """No atomics anywhere: the same call twice gives the same bits (also in deterministic mode)."""
    args = _conv_args("3x3s1_odd", torch.float32, "nhwc", device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _run("conv_stats", *args), _run("conv_stats", *args)
        y, mean, _ = first
        tail = (y, mean, mean, y, None, None, True)
        grads = [_run("bn_add_relu_backward", torch.ones_like(y), *tail, [True] * 4) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first + grads[0], second + grads[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_on_triton(device):
    """The ops' fakes agree with what the Triton kernels return; no output aliases an input."""
    args = _conv_args("3x3s2", torch.float32, "nhwc", device)
    y, mean, _ = reference.conv_stats(*args)
    tail = (y, _vec(12, device, True), _vec(12, device), torch.randn_like(y), None, None, True)
    x, _, _, _, weight, *conv = args
    with fused_resnet.use_backend("triton"):
        torch.library.opcheck(ops.conv_stats, args, test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(ops.bn_add_relu, tail, test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(ops.conv_bias_act, (x, weight, _vec(12, device), None, *conv, True),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_stats_large_mean(layout, device):
    """|mean| / std = 1e4: the statistics must keep the variance's digits (no E[y^2] - E[y]^2)."""
    n, c, h, w = 2, 7, 47, 49  # N*H*W = 4606 rows: more than one row chunk under the interpreter
    x = _act((n, c, h, w), torch.float32, layout, device) * 1e-3 + 10.0
    weight = torch.eye(c, device=device).view(c, c, 1, 1) * 100.0  # y = 100 * x: mean 1e3, std 0.1
    args = (x, None, None, False, weight, [1, 1], [0, 0], [1, 1], 1)
    y, mean, var = _run("conv_stats", *args)
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    assert_close(mean, mean64, torch.float32, name="mean")
    assert_close(var, var64, torch.float32, name="var")


@pytest.mark.parametrize("device", DEVICES)
def test_combine_partial_stats(device):
    """The public merge: counts [T] or [T, C], empty tiles with garbage means, an optional shift."""
    t, c = 37, 70
    counts = torch.randint(0, 50, (t,), device=device).float()
    counts[3] = 0
    means = torch.randn(t, c, device=device) * 0.1 + 5.0
    means[3] = float("nan")  # an empty tile's 0/0 mean must not leak
    m2s = torch.rand(t, c, device=device) * counts[:, None]
    valid = counts > 0
    n64, mu64, m264 = counts[valid].double()[:, None], means[valid].double(), m2s[valid].double()
    mean_ref = (n64 * mu64).sum(0) / n64.sum()
    var_ref = (m264 + n64 * (mu64 - mean_ref) ** 2).sum(0) / n64.sum()
    for cnt in (counts, counts[:, None].expand(t, c).contiguous()):
        mean, var = _stats.combine_partial_stats(cnt, means, m2s)
        assert_close(mean, mean_ref, torch.float32, name="mean")
        assert_close(var, var_ref, torch.float32, name="var")
    shift = torch.full((c,), 5.0, device=device)
    mean, var = _stats.combine_partial_stats(counts, means - shift, m2s, shift)
    assert_close(mean, mean_ref, torch.float32, name="shifted mean")
    assert_close(var, var_ref, torch.float32, name="shifted var")


# bn_add_relu: (scale, shift, residual, residual affine, relu)
TAILS = {
    "bn_identity_relu": (True, True, True, False, True),
    "bn_bnds_relu": (True, True, True, True, True),
    "bn_relu": (True, True, False, False, True),
    "add_relu": (False, False, True, False, True),
    "shift_res_norelu": (False, True, True, False, False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tail", TAILS)
def test_bn_add_relu(tail, dtype, layout, device):
    has_affine, has_shift, has_res, has_res_affine, relu = TAILS[tail]
    n, c, h, w = (1, 70, 5, 9) if tail == "bn_relu" else (2, 67, 7, 5)
    y = _act((n, c, h, w), dtype, layout, device)
    residual = _act((n, c, h, w), dtype, layout, device) if has_res else None
    args = (
        y, _vec(c, device, True) if has_affine else None, _vec(c, device) if has_shift else None, residual,
        _vec(c, device, True) if has_res_affine else None, _vec(c, device) if has_res_affine else None, relu,
    )
    _compare(_run("bn_add_relu", *args), (reference.bn_add_relu(*args),), dtype, ("out",))
    grad = torch.randn_like(y)
    for mask in ([True, True, True, True], [False, True, False, True], [True, False, True, False]):
        bargs = (grad, *args, mask)
        _compare(_run("bn_add_relu_backward", *bargs), reference.bn_add_relu_backward(*bargs), dtype,
                 ("grad_y", "grad_scale", "grad_shift", "grad_res", "grad_res_scale", "grad_res_shift"))


@pytest.mark.parametrize("device", DEVICES)
def test_bn_add_relu_backward_many_rows(device):
    """More rows than one row chunk: the per-channel reductions cross chunk boundaries."""
    y = _act((3, 3, 41, 43), torch.float32, "nhwc", device)
    args = (y, _vec(3, device, True), _vec(3, device), None, None, None, True)
    bargs = (torch.randn_like(y), *args, [True, True, False, False])
    _compare(_run("bn_add_relu_backward", *bargs), reference.bn_add_relu_backward(*bargs), torch.float32,
             ("grad_y", "grad_scale", "grad_shift", "grad_res", "grad_res_scale", "grad_res_shift"))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_and_expanded_gradient(device):
    """A sliced (non-mergeable) input is copied once; an expanded (stride-0) gradient is read as is."""
    base = torch.randn(2, 5, 14, 9, device=device)
    y = base[:, :, ::2]  # H stride 2*W: H and W do not merge
    residual = torch.randn(2, 5, 7, 9, device=device).contiguous(memory_format=torch.channels_last)
    args = (y, _vec(5, device, True), _vec(5, device), residual, None, None, True)
    _compare(_run("bn_add_relu", *args), (reference.bn_add_relu(*args),), torch.float32, ("out",))
    grad = torch.ones((), device=device).expand(y.shape)  # what autograd hands over for out.sum()
    bargs = (grad, *args, [True, True, True, True])
    _compare(_run("bn_add_relu_backward", *bargs), reference.bn_add_relu_backward(*bargs), torch.float32,
             ("grad_y", "grad_scale", "grad_shift", "grad_res", "grad_res_scale", "grad_res_shift"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["bias_res_relu", "bias_relu", "plain", "res_norelu"])
def test_conv_bias_act(variant, dtype, layout, device):
    x, _, _, _, weight, *conv = _conv_args("3x3s1_odd" if variant != "plain" else "3x3s2", dtype, layout, device)
    x = x[:1].contiguous(memory_format=LAYOUTS[layout])  # N=1: the eval-mode case
    out_shape = reference.conv_bias_act(x, weight, None, None, *conv, False).shape
    bias = _vec(weight.shape[0], device) if "bias" in variant else None
    residual = _act(out_shape, dtype, layout, device) if "res" in variant else None
    relu = "norelu" not in variant and variant != "plain"
    args = (x, weight, bias, residual, *conv, relu)
    _compare(_run("conv_bias_act", *args), (reference.conv_bias_act(*args),), dtype, ("out",))
    out = reference.conv_bias_act(*args)
    for mask in ([True, True, True, True], [False, True, bias is not None, False], [True, False, False, True]):
        bargs = (torch.randn_like(out), x, weight, out, relu, *conv, mask)
        _compare(_run("conv_bias_act_backward", *bargs), reference.conv_bias_act_backward(*bargs), dtype,
                 ("grad_x", "grad_w", "grad_bias", "grad_res"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_running_stats(momentum, device):
    c = 70
    mean, var = _vec(c, device), _vec(c, device, True)
    state = (_vec(c, device), _vec(c, device, True), torch.tensor(4, device=device))
    expected = tuple(t.clone() for t in state)
    _run("update_running_stats_", *state, mean, var, 98, momentum)
    reference.update_running_stats_(*expected, mean, var, 98, momentum)
    for got, want, name in zip(state, expected, ("running_mean", "running_var", "num_batches_tracked")):
        if name == "num_batches_tracked":
            assert got.item() == want.item()
        else:
            assert_close(got, want, torch.float32, name=name)  # fp64 math, stored in fp32


@pytest.mark.parametrize("device", DEVICES)
def test_fp64_falls_back_to_reference(device):
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device)
    with fused_resnet.use_backend("triton"), fused_resnet.trace_dispatch() as log:
        out = ops.bn_add_relu(y, None, None, y, None, None, True)
    assert log == [("bn_add_relu", "reference")]
    assert_close(out, torch.relu(2 * y))


def test_int64_offsets():
    """The offset math promotes to int64 before multiplying: rows x huge strides, no huge tensor."""

    @triton.jit
    def offsets_kernel(out_ptr, M, HW, s_n, s_c, s_hw, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        n, hw, valid = _tiling.rows_of(tl.program_id(0).to(tl.int64) * BLOCK_M, M, HW, BLOCK_M)
        c = tl.arange(0, BLOCK_C)
        off = _tiling.tile_offsets(n, hw, c, s_n, s_c, s_hw, True)
        mask = _tiling.tile_mask(valid, c < BLOCK_C, True)
        out = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * BLOCK_C + c[None, :]
        tl.store(out_ptr + out, off, mask=mask)

    tl = triton.language
    m, hw, c = 12, 3, 4
    s_n, s_c, s_hw = 2**31 - 1, 2**30 + 3, 2**29 + 7  # each fits int32; n * s_n does not
    device = "cpu" if _tiling.INTERPRETED else "cuda"
    got = torch.empty(m, c, dtype=torch.int64, device=device)
    offsets_kernel[(triton.cdiv(m, 8),)](got, m, hw, s_n, s_c, s_hw, BLOCK_M=8, BLOCK_C=c)
    rows = torch.arange(m, dtype=torch.int64)
    want = (rows // hw * s_n + rows % hw * s_hw)[:, None] + torch.arange(c, dtype=torch.int64)[None, :] * s_c
    assert torch.equal(got.cpu(), want)


@pytest.mark.cuda
def test_int64_offsets_huge_tensor_cuda():
    """A real view whose third image starts past 2**31 elements, with an image stride that fits
    int32 (so only promoting the row index saves the product); ~4 GiB of GPU memory."""
    s_n = 2**30 + 2**12
    base = torch.randn(2 * s_n + 2**12, dtype=torch.float16, device="cuda")
    y = base.as_strided((3, 8, 16, 16), (s_n, 256, 16, 1))
    with fused_resnet.use_backend("triton"):
        out = ops.bn_add_relu(y, None, None, None, None, None, True)
    assert_close(out, torch.relu(y.float()).half())


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CONVS)
def test_bf16_cuda(case, layout):
    args = _conv_args(case, torch.bfloat16, layout, "cuda")
    _compare(_run("conv_stats", *args), reference.conv_stats(*args), torch.bfloat16, ("y", "mean", "var"))
    y, mean, _ = reference.conv_stats(*args)
    bargs = (torch.randn_like(y), _vec(y.shape[1], "cuda"), _vec(y.shape[1], "cuda"), *args[:5], y, mean, *args[5:],
             [True, True, True])
    _compare(_run("conv_stats_backward", *bargs), reference.conv_stats_backward(*bargs), torch.bfloat16,
             ("grad_x", "grad_scale", "grad_shift", "grad_w"))
    tail = (y, _vec(y.shape[1], "cuda", True), _vec(y.shape[1], "cuda"), torch.randn_like(y), None, None, True)
    _compare(_run("bn_add_relu", *tail), (reference.bn_add_relu(*tail),), torch.bfloat16, ("out",))


@pytest.mark.cuda
def test_cuda_graph_capture():
    """No host syncs, no data-dependent allocations: a training step's kernels replay in a graph."""
    args = _conv_args("3x3s1_odd", torch.float16, "nhwc", "cuda")
    with fused_resnet.use_backend("triton"):
        ops.conv_stats(*args)  # tune and decide outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, mean, var = ops.conv_stats(*args)
    graph.replay()
    torch.cuda.synchronize()
    _compare((y, mean, var), reference.conv_stats(*args), torch.float16, ("y", "mean", "var"))


# --- the conv path choice -------------------------------------------------------------------------


def test_choice_modes(monkeypatch):
    """``FUSED_RESNET_TRITON_CONV`` forces a path; ``auto`` off a GPU takes torch's conv."""
    calls = []

    def fake_gemm(*args):
        calls.append("gemm")
        return "gemm"

    monkeypatch.setattr(_choice, "_gemm_kernel", lambda kernel: (fake_gemm, lambda *a: True))
    args = (torch.zeros(1),)
    for mode, expected in (("gemm", fake_gemm), ("torch", None), ("auto", None)):
        monkeypatch.setenv(_choice.MODE_ENV, mode)
        chosen = _choice.choose("conv_stats", args, torch_fn=len)
        assert chosen is (expected or len), mode
    monkeypatch.setenv(_choice.MODE_ENV, "bogus")
    with pytest.raises(ValueError, match="FUSED_RESNET_TRITON_CONV"):
        _choice.choose("conv_stats", args, torch_fn=len)
    monkeypatch.setattr(_choice, "_gemm_kernel", lambda kernel: (fake_gemm, lambda *a: False))
    monkeypatch.setenv(_choice.MODE_ENV, "gemm")
    assert _choice.choose("conv_stats", args, torch_fn=len) is len  # unsupported args: torch's conv


@pytest.mark.parametrize("mode", ["torch", "gemm"])
def test_both_conv_paths_match_reference(mode, monkeypatch):
    """Each conv path through the registered kernels (the GEMM one where ``_conv_gemm`` has it)."""
    monkeypatch.setenv(_choice.MODE_ENV, mode)
    ran = []
    real_choose = _choice.choose

    def spy(kernel, args, torch_fn):
        fn = real_choose(kernel, args, torch_fn)
        ran.append((kernel, "torch" if fn is torch_fn else "gemm"))
        return fn

    monkeypatch.setattr(_choice, "choose", spy)
    device = "cpu" if _tiling.INTERPRETED else "cuda"
    args = _conv_args("3x3s2", torch.float32, "nhwc", device)
    _compare(_run("conv_stats", *args), reference.conv_stats(*args), torch.float32, ("y", "mean", "var"))
    y, mean, _ = reference.conv_stats(*args)
    x, scale, shift, in_relu, weight, *conv = args
    bargs = (torch.randn_like(y), _vec(y.shape[1], device), _vec(y.shape[1], device), x, scale, shift, in_relu,
             weight, y, mean, *conv, [True, True, True])
    _compare(_run("conv_stats_backward", *bargs), reference.conv_stats_backward(*bargs), torch.float32,
             ("grad_x", "grad_scale", "grad_shift", "grad_w"))
    cargs = (x, weight, _vec(weight.shape[0], device), torch.randn_like(y), *conv, True)
    _compare(_run("conv_bias_act", *cargs), (reference.conv_bias_act(*cargs),), torch.float32, ("out",))
    out = reference.conv_bias_act(*cargs)
    cbargs = (torch.randn_like(out), x, weight, out, True, *conv, [True, True, True, True])
    _compare(_run("conv_bias_act_backward", *cbargs), reference.conv_bias_act_backward(*cbargs), torch.float32,
             ("grad_x", "grad_w", "grad_bias", "grad_res"))
    expected = []
    for kernel, kargs in (("conv_stats", args), ("conv_stats_backward", bargs), ("conv_bias_act", cargs),
                          ("conv_bias_act_backward", cbargs)):
        gemm = _choice._gemm_kernel(kernel)
        expected.append((kernel, "gemm" if mode == "gemm" and gemm is not None and gemm[1](*kargs) else "torch"))
    assert ran == expected


def test_choice_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv(_choice.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(_choice, "_decisions", None)
    _choice._store("H100|k|shape", {"path": "gemm", "torch_ms": 2.0, "gemm_ms": 1.0})
    assert (tmp_path / "choices.json").exists()
    monkeypatch.setattr(_choice, "_decisions", None)  # a fresh process reads it back
    assert _choice.decision_records()["H100|k|shape"]["path"] == "gemm"
    assert _choice.decisions() == ["H100|k|shape -> gemm (torch 2.000 ms, gemm 1.000 ms)"]


@pytest.mark.cuda
def test_choice_measures_once_and_not_during_capture(tmp_path, monkeypatch):
    monkeypatch.setenv(_choice.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(_choice.MODE_ENV, "auto")
    monkeypatch.setattr(_choice, "_decisions", None)
    if _choice._gemm_kernel("conv_stats") is None:
        pytest.skip("no implicit-GEMM conv_stats to choose from")
    args = _conv_args("3x3s1_odd", torch.float16, "nhwc", "cuda")
    _run("conv_stats", *args)
    assert len(_choice.decisions()) == 1
    _run("conv_stats", *args)
    assert len(_choice.decisions()) == 1
    other = _conv_args("3x3s2", torch.float16, "nhwc", "cuda")
    monkeypatch.setenv(_choice.MODE_ENV, "torch")
    _run("conv_stats", *other)  # autotunes the Triton kernels for this shape (never inside a capture)
    monkeypatch.setenv(_choice.MODE_ENV, "auto")
    assert len(_choice.decisions()) == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _run("conv_stats", *other)
    assert len(_choice.decisions()) == 1
