"""The ``triton`` backend's elementwise and per-channel kernels (BN tail, running stats, the partial
statistics merge) against the reference, the fp64 fallback, and the kernels' int64 offset math."""

from __future__ import annotations

import pytest
import torch
from _triton_cases import (
    DEVICES,
    DTYPES,
    LAYOUTS,
    _act,
    _compare,
    _poison,  # noqa: F401  (autouse fixture)
    _run,
    _vec,
    ops,
)

import fused_resnet
from fused_resnet import reference
from fused_resnet._tolerances import assert_close

triton = pytest.importorskip("triton")
from fused_resnet.backends.triton import _stats, _tiling


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [3, 1])
def test_bn_add_relu_gate(n, dtype, layout, device):
    """The per-(sample, channel) gate (``_gate``: NCHW as [1, N*C, H, W], channels_last per sample, one
    sample as it is): forward and every gradient, the gate's included, against the reference (layouts
    too: a channels_last sample stays channels_last)."""
    c, h, w = 67, 7, 5
    y, residual = _act((n, c, h, w), dtype, layout, device), _act((n, c, h, w), dtype, layout, device)
    for gate, affine in ((torch.rand(n, c, 1, 1, device=device).to(dtype) + 0.5, True),
                         (torch.rand(n, c, device=device) + 0.5, False)):
        args = (y, _vec(c, device, True), _vec(c, device), residual,
                _vec(c, device, True) if affine else None, _vec(c, device) if affine else None, True)
        _compare(_run("bn_add_relu", *args, gate), (reference.bn_add_relu(*args, gate),), dtype, ("out",))
        grad = torch.randn_like(y)
        for mask in ([True, True, True, True], [False, True, False, True]):
            _compare(_run("bn_add_relu_backward", grad, *args, mask, "", gate),
                     reference.bn_add_relu_backward(grad, *args, mask, gate), dtype,
                     ("grad_y", "grad_scale", "grad_shift", "grad_res", "grad_res_scale", "grad_res_shift",
                      "grad_gate"))
