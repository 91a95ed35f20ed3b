"""Property-based sweep: fused blocks against the plain nn blocks over random configurations."""

import copy

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import fused_resnet
from fused_resnet._tolerances import assert_close

from _tv_resnet import TVBasicBlock, TVBottleneck


@st.composite
def block_configs(draw):
    bottleneck = draw(st.booleans())
    planes = draw(st.integers(1, 6))
    cin = draw(st.integers(1, 12))
    stride = draw(st.sampled_from([1, 2]))
    expansion = 4 if bottleneck else 1
    needs_ds = stride != 1 or cin != planes * expansion
    return dict(
        bottleneck=bottleneck, planes=planes, cin=cin, stride=stride, needs_ds=needs_ds,
        batch=draw(st.integers(1, 3)), h=draw(st.integers(3, 9)), w=draw(st.integers(3, 9)),
        channels_last=draw(st.booleans()), train=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.3, None])), steps=draw(st.integers(1, 2)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=block_configs())
def test_fused_block_matches_nn_block(cfg):
    h_out, w_out = (cfg["h"] - 1) // cfg["stride"] + 1, (cfg["w"] - 1) // cfg["stride"] + 1
    # nn.BatchNorm2d itself refuses a single value per channel in training (tested in test_errors).
    assume(not (cfg["train"] and cfg["batch"] * h_out * w_out == 1))
    torch.manual_seed(0)
    block_cls = TVBottleneck if cfg["bottleneck"] else TVBasicBlock
    out_c = cfg["planes"] * block_cls.expansion
    ds = None
    if cfg["needs_ds"]:
        ds = nn.Sequential(nn.Conv2d(cfg["cin"], out_c, 1, cfg["stride"], bias=False), nn.BatchNorm2d(out_c))
    plain = block_cls(cfg["cin"], cfg["planes"], cfg["stride"], ds).double()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = cfg["momentum"]
            nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.uniform_(m.bias, -0.5, 0.5)
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    plain.train(cfg["train"]), fused.train(cfg["train"])
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    for _ in range(cfg["steps"]):
        x = torch.randn(cfg["batch"], cfg["cin"], cfg["h"], cfg["w"], dtype=torch.float64).to(memory_format=fmt)
        xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_p, out_f = plain(xp), fused(xf)
        assert_close(out_f, out_p, tol=1e-9, name="output")
        g = torch.randn_like(out_p)
        out_p.backward(g), out_f.backward(g)
        assert_close(xf.grad, xp.grad, tol=1e-9, name="grad input")
        for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
            assert_close(q.grad, p.grad, tol=1e-9, name=name)
    for (name, b), c in zip(plain.named_buffers(), fused.buffers()):
        assert_close(c.double(), b.double(), tol=1e-9, name=name)
