"""DenseNet (issue #16): the fused dense block and transition against the unfused torchvision / timm
models in fp64 (outputs, every gradient, running statistics over several steps, eval), fp32 against
eager fp32's own error, the fallbacks, what fuse() reports, saved memory, and torch.compile."""

import copy
import warnings

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import dense_ops
from fused_resnet._tolerances import relative_error
from fused_resnet.benchmark.saved_memory import saved_activation_bytes_with_checkpoints

from _parity import FP64_MODEL_TOL, assert_step_matches, grad_errors, randomize_bns, step_errors

torchvision = pytest.importorskip("torchvision")
F64 = torch.float64


def small_densenet(**kw) -> nn.Module:
    """A torchvision DenseNet-BC with two blocks (2 and 3 layers) and a transition, small widths."""
    args = dict(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2, num_classes=10)
    return torchvision.models.DenseNet(**{**args, **kw})


def _pair(model: nn.Module, dtype=F64) -> tuple[nn.Module, nn.Module]:
    plain = randomize_bns(model.to(dtype))
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


def _x(n=3, size=32, dtype=F64):
    return torch.randn(n, 3, size, size, dtype=dtype)


def _fused_names(model):
    return [n for n, m in model.named_modules() if type(m).__name__.startswith("FusedDense")]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["plain", "memory_efficient"])
def test_small_densenet_fp64_several_steps_then_eval(momentum, memory_efficient):
    """memory_efficient=True fused is compared with the plain unfused model: unfused, torchvision's
    checkpoint recomputes norm1 in backward and so updates its running statistics twice a step
    (num_batches_tracked += 2); the fused block computes once and updates once, as nn.BatchNorm2d."""
    plain = small_densenet()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    plain, fused = _pair(plain)
    for layer in fused.modules():
        if hasattr(layer, "memory_efficient"):
            layer.memory_efficient = memory_efficient
    assert _fused_names(fused) == ["features.denseblock1", "features.transition1", "features.denseblock2"]
    with fused_resnet.use_backend("reference"):
        for _ in range(3):
            assert_step_matches(plain, fused, _x(), train=True)
        for n in (3, 1):  # eval, also at batch 1
            assert_step_matches(plain, fused, _x(n), train=False)
        with torch.no_grad():  # eval without autograd: the buffer path in plain ATen
            plain.eval(), fused.eval()
            x = _x()
            assert relative_error(fused(x), plain(x)) <= FP64_MODEL_TOL


def test_memory_efficient_unfused_updates_norm1_twice():
    """What the test above works around: torchvision's checkpointed layer runs norm1 again in backward."""
    model = small_densenet(memory_efficient=True).train()
    model(_x(2, 32, torch.float32)).sum().backward()
    assert model.features.denseblock1.denselayer1.norm1.num_batches_tracked.item() == 2
    fused = fused_resnet.fuse(small_densenet(memory_efficient=True).train())
    fused(_x(2, 32, torch.float32)).sum().backward()
    assert fused.features.denseblock1.denselayer1.norm1.num_batches_tracked.item() == 1


def test_input_gradient_and_statistics_gradients_fp64():
    """The gradient w.r.t. the block input (through the one statistics pass of a pooled map) and
    through the returned batch statistics, against autograd on the unfused block."""
    plain, fused = _pair(small_densenet())
    block_p, block_f = plain.features.denseblock1, fused.features.denseblock1
    x = torch.randn(4, 16, 8, 8, dtype=F64) * 2 + 0.5
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_p = block_p(xp)
    var_p, mean_p = torch.var_mean(out_p, dim=(0, 2, 3), correction=0)
    layers = block_f.fused_layers
    specs = tuple(dense_ops.DenseLayerSpec(m.norm1.eps, m.norm2.eps, dense_ops.Conv([1, 1], [0, 0], [1, 1], 1),
                                           dense_ops.Conv([1, 1], [1, 1], [1, 1], 1)) for m in layers)
    params = [dense_ops.DenseLayerParams(m.norm1.weight, m.norm1.bias, m.conv1.weight, m.norm2.weight, m.norm2.bias,
                                         m.conv2.weight) for m in layers]
    with fused_resnet.use_backend("reference"):
        out_f = dense_ops.dense_block(xf, specs, params)
    assert relative_error(out_f.features, out_p) <= 1e-12
    assert relative_error(out_f.mean, mean_p) <= 1e-12 and relative_error(out_f.var, var_p) <= 1e-12
    w = torch.randn_like(out_p)
    cm, cv = torch.randn_like(mean_p), torch.randn_like(var_p)
    ((out_p * w).sum() + (mean_p * cm).sum() + (var_p * cv).sum()).backward()
    ((out_f.features * w).sum() + (out_f.mean * cm).sum() + (out_f.var * cv).sum()).backward()
    assert relative_error(xf.grad, xp.grad) <= 1e-10
    errors = grad_errors(block_p, block_f)
    assert errors and max(errors.values()) <= 1e-10, errors


def test_dense_block_gradcheck():
    torch.manual_seed(0)
    specs = (dense_ops.DenseLayerSpec(1e-5, 1e-3, dense_ops.Conv([1, 1], [0, 0], [1, 1], 1),
                                      dense_ops.Conv([1, 1], [1, 1], [1, 1], 1)),) * 2
    x = torch.randn(3, 2, 3, 3, dtype=F64, requires_grad=True)
    tensors = []
    for c in (2, 4):
        tensors += [torch.rand(c, dtype=F64) + 0.5, torch.randn(c, dtype=F64), torch.randn(3, c, 1, 1, dtype=F64),
                    torch.rand(3, dtype=F64) + 0.5, torch.randn(3, dtype=F64), torch.randn(2, 3, 3, 3, dtype=F64)]
    tensors = [t.requires_grad_() for t in tensors]

    def fn(x, *flat):
        layers = [dense_ops.DenseLayerParams(*flat[6 * i:6 * i + 6]) for i in range(2)]
        out = dense_ops.dense_block(x, specs, layers)
        return out.features, out.mean, out.var

    with fused_resnet.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, (x, *tensors))


@pytest.mark.slow
def test_densenet121_fp64_train_and_eval():
    plain, fused = _pair(torchvision.models.densenet121(num_classes=10))
    report = fused_resnet.fusion_report(fused)
    assert sum(v.startswith("fused") for v in report.values()) == 120 and len(report) == 121
    assert report["features.norm5"].startswith("not fused")
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in plain.named_modules()]
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(2, 64), train)  # 64px: 2x2 maps in the last block


def test_timm_densenet_fp64():
    timm = pytest.importorskip("timm")
    plain = timm.create_model("densenet121", pretrained=False, num_classes=10, growth_rate=8,
                              block_config=(2, 3), stem_type="", bn_size=2)
    plain, fused = _pair(plain)
    names = _fused_names(fused)
    assert "features.denseblock1" in names and "features.transition1" in names, names
    with fused_resnet.use_backend("reference"):
        for train in (True, True, False):
            assert_step_matches(plain, fused, _x(), train)


def test_fp32_within_three_times_eager_error():
    """fp32 fused vs the fp64 model: at most ~3x eager fp32's own error (output, every gradient)."""
    plain64, _ = _pair(small_densenet())
    eager32 = copy.deepcopy(plain64).float()
    fused32 = fused_resnet.fuse(copy.deepcopy(eager32))
    x = _x()
    errors = {}
    for name, model in (("eager", eager32), ("fused", fused32)):
        base = copy.deepcopy(plain64)
        out64, out32 = base.train()(x), model.train()(x.float())
        out64.square().sum().backward(), out32.square().sum().backward()
        g = grad_errors(base, model)
        errors[name] = {"output": relative_error(out32, out64), **g}
    floor = max(errors["eager"].values()) * 1e-3
    worst = max(errors["fused"][k] / max(errors["eager"][k], floor) for k in errors["fused"])
    assert worst <= 3.0, worst


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fp32_native_backend_matches_eager(channels_last):
    plain, fused = _pair(small_densenet(), torch.float32)
    x = _x(4, 32, torch.float32)
    if channels_last:
        plain, fused = plain.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    errors = step_errors(plain, fused, x, True)
    assert max(errors.values()) <= 1e-4, max(errors.items(), key=lambda kv: kv[1])


def test_fallbacks_run_the_modules_own_forward():
    """drop_rate > 0 in training, a hook on a layer, a replaced module: the block's own forward, so
    the results are the unfused ones exactly (same dropout draws); removed, the fused path again."""
    plain, fused = _pair(small_densenet(drop_rate=0.2))
    with fused_resnet.use_backend("reference"):
        assert_step_matches(plain, fused, _x(), True)  # dropout: own forward, the same random draws
        assert_step_matches(plain, fused, _x(), False)
    plain, fused = _pair(small_densenet())
    calls = []
    handle = fused.features.denseblock1.denselayer2.conv1.register_forward_hook(lambda *a: calls.append(1))
    with fused_resnet.use_backend("reference"):
        assert_step_matches(plain, fused, _x(), True)
        assert calls == [1]
        assert fused_resnet.fusion_report(fused)["features.denseblock1.denselayer2.norm1"].startswith("not fused")
        handle.remove()
        assert fused_resnet.fusion_report(fused)["features.denseblock1.denselayer2.norm1"].startswith("fused")
        fused.features.transition1.norm = copy.deepcopy(fused.features.transition1.norm)
        plain.features.transition1.norm = copy.deepcopy(plain.features.transition1.norm)
        assert fused_resnet.fusion_report(fused)["features.transition1.norm"].startswith("not fused")
        assert_step_matches(plain, fused, _x(), True)
        fused_resnet.fuse(fused)  # fuses the replaced module again
        assert fused_resnet.fusion_report(fused)["features.transition1.norm"].startswith("fused")
        assert_step_matches(plain, fused, _x(), True)


def test_unfusable_layer_is_reported_and_left_alone():
    plain = small_densenet()
    plain.features.denseblock2.denselayer1.norm1 = nn.GroupNorm(1, 32)
    fusable = fused_resnet.find_fusable(plain)
    assert "features.denseblock1" in fusable and "features.transition1" in fusable
    assert "features.denseblock2" not in fusable
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    assert "features.denseblock2" not in _fused_names(fused)
    report = fused_resnet.fusion_report(fused)
    assert report["features.denseblock2.denselayer2.norm1"].startswith("not fused: a layer of its dense block")
    assert report["features.denseblock1.denselayer1.norm1"].startswith("fused")


def test_saved_memory_below_half_of_eager_and_below_memory_efficient():
    torch.manual_seed(0)
    eager = small_densenet(block_config=(4, 4)).train()
    memeff = small_densenet(block_config=(4, 4), memory_efficient=True).train()
    memeff.load_state_dict(eager.state_dict())
    fused = fused_resnet.fuse(copy.deepcopy(eager))
    x = _x(4, 32, torch.float32)
    saved = {name: saved_activation_bytes_with_checkpoints(m, x) for name, m in
             (("eager", eager), ("memeff", memeff), ("fused", fused))}
    assert saved["fused"] <= 0.5 * saved["eager"], saved
    assert saved["fused"] <= saved["memeff"], saved


def test_pickle_and_deepcopy_keep_the_fused_classes():
    import pickle
    _, fused = _pair(small_densenet())
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert _fused_names(clone) == _fused_names(fused)
        assert clone.features.denseblock1.fused_layers[0].layer is clone.features.denseblock1.denselayer1


@pytest.mark.slow
def test_compiled_training_step_matches_eager_fused():
    """torch.compile (default inductor backend) of a fused DenseNet in training: outputs, every
    gradient and the running statistics as the eager fused model's (fp32)."""
    plain, fused = _pair(small_densenet(), torch.float32)
    compiled_model = copy.deepcopy(fused)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = _x(4, 32, torch.float32)
    for _ in range(2):
        errors = step_errors(fused, compiled, x, True)
        assert max(errors.values()) <= 1e-4, max(errors.items(), key=lambda kv: kv[1])
    with torch.no_grad():  # eval: the plain-ATen buffer path, compiled too
        fused.eval(), compiled.eval()
        assert relative_error(compiled(x), fused(x)) <= 1e-5


def test_bf16_autocast_within_three_times_eager_error():
    """Under CPU bf16 autocast the block casts its input and conv weights as conv2d would; output and
    input gradient within ~3x eager autocast's own error vs the fp64 model."""
    plain64, _ = _pair(small_densenet())
    eager32 = copy.deepcopy(plain64).float()
    fused32 = fused_resnet.fuse(copy.deepcopy(eager32))
    x = _x()
    x64 = x.clone().requires_grad_()
    out64 = plain64.train()(x64)
    out64.square().sum().backward()
    errors = {}
    for name, model in (("eager", eager32), ("fused", fused32)):
        xi = x.float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.train()(xi)
        out.float().square().sum().backward()
        errors[name] = (relative_error(out, out64), relative_error(xi.grad, x64.grad))
    for i in range(2):
        assert errors["fused"][i] <= 3 * errors["eager"][i] + 1e-3, errors


def test_block_saves_its_buffer_and_bottlenecks_only():
    """A fused block keeps for backward the feature buffer, each bottleneck conv output and
    per-channel statistics: nothing quadratic in depth, no normalised concatenation."""
    _, fused = _pair(small_densenet(block_config=(4, 4)), torch.float32)
    block = fused.features.denseblock1.train()
    n, c0, hw = 4, block.denselayer1.conv1.in_channels, 8
    x = torch.randn(n, c0, hw, hw, requires_grad=True)
    saved = saved_activation_bytes_with_checkpoints(block, x)
    layers = list(block.children())
    total = c0 + sum(m.conv2.out_channels for m in layers)
    activations = 4 * n * hw * hw * (total + sum(m.conv1.out_channels for m in layers))
    per_channel = 4 * 2 * (total + sum(m.conv1.out_channels for m in layers))
    assert activations <= saved <= activations + per_channel, (saved, activations)


@pytest.mark.parametrize("bn_kw", [dict(affine=False), dict(track_running_stats=False)], ids=["no_affine", "no_stats"])
def test_batch_norms_without_affine_or_running_stats(bn_kw):
    """BNs without gamma/beta, or without running statistics (batch statistics in eval too)."""
    model = small_densenet()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(module, name, nn.BatchNorm2d(child.num_features, **bn_kw))
    plain = model.double()  # randomize_bns needs both the affine parameters and the running statistics
    fused = fused_resnet.fuse(copy.deepcopy(plain))
    assert "features.denseblock1" in _fused_names(fused)
    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, _x(), train)


def test_prepared_and_exported_eval_emit_plain_aten():
    """prepare_for_inference leaves the dense modules correct; torch.export of the fused model in
    eval holds none of our ops (plain ATen) and computes what the unfused model does."""
    plain, fused = _pair(small_densenet(), torch.float32)
    x = _x(2, 32, torch.float32)
    plain.eval()
    fused_resnet.prepare_for_inference(fused)
    with torch.no_grad():
        assert relative_error(fused(x), plain(x)) <= 1e-5
    exported = torch.export.export(fused, (x,))
    assert not [n for n in exported.graph.nodes if "fused_resnet" in str(n.target)]
    assert relative_error(exported.module()(x), plain(x)) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eval_block_without_grad_matches(channels_last):
    """The dense block and the transition in eval without autograd (one feature buffer; in NCHW each
    BN + ReLU in its 1x1 conv's prologue, in channels_last plain ATen ops): fp64 on the reference backend
    equal to the unfused model, fp32 on the native backend within 3x eager fp32's own error vs fp64."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain, fused = _pair(small_densenet())
    plain, fused = plain.to(memory_format=fmt).eval(), fused.to(memory_format=fmt).eval()
    x = _x().to(memory_format=fmt)
    with torch.no_grad():
        with fused_resnet.use_backend("reference"):
            assert relative_error(fused(x), plain(x)) <= FP64_MODEL_TOL
        want = plain(x)
        plain32, fused32 = copy.deepcopy(plain).float(), copy.deepcopy(fused).float()
        eager_err = relative_error(plain32(x.float()), want)
        assert relative_error(fused32(x.float()), want) <= 3 * eager_err + 1e-6


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_prepared_eval_block_folds_once_and_guards(channels_last):
    """prepare_for_inference folds each dense layer's norm1 (scale, shift) and conv1 + norm2 once (in
    channels_last conv1 then runs as a prepared conv: the native routes): fp64 on the reference backend
    equal to the unfused model, fp32 on the native backend within 3x eager fp32's own error vs fp64, at
    batch 3 and 1; a norm1 or norm2 changed in place afterwards warns and the block folds again (still
    right); train(), a deep copy and unfuse drop the prepared state."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain, fused = _pair(small_densenet())
    plain, fused = plain.to(memory_format=fmt).eval(), fused.to(memory_format=fmt)
    fused_resnet.prepare_for_inference(fused)
    blocks = [m for m in fused.modules() if isinstance(m, fused_resnet.dense.FusedDenseBlock)]
    assert blocks and all("_prepared_norms" in b.__dict__ and b.__dict__["_prepared"] for b in blocks)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing stale: the prepared folds serve
        for n in (3, 1):
            x = _x(n).to(memory_format=fmt)
            with fused_resnet.use_backend("reference"):
                assert relative_error(fused(x), plain(x)) <= FP64_MODEL_TOL
        plain32, fused32 = copy.deepcopy(plain).float(), fused_resnet.prepare_for_inference(
            copy.deepcopy(fused).float())
        blocks32 = [b for b in fused32.modules() if isinstance(b, fused_resnet.dense.FusedDenseBlock)]
        assert all("_prepared_norms" in b.__dict__ for b in blocks32)
        for n in (3, 1):
            x = _x(n).to(memory_format=fmt)
            want = plain(x)
            assert fused32.features(x.float()).is_contiguous(memory_format=fmt)  # the block keeps the layout
            out = fused32(x.float())
            assert relative_error(out, want) <= 3 * relative_error(plain32(x.float()), want) + 1e-6
        assert all("_prepared_norms" in b.__dict__ for b in blocks + blocks32)  # still prepared: they served
        # ... and what runs: a prepared fold changed behind the model's back shows in the output.
        prepared = copy.copy(blocks[0].__dict__["_prepared_norms"][1])
        prepared.scale = prepared.scale * 2
        blocks[0].__dict__["_prepared_norms"][1] = prepared
        x = _x().to(memory_format=fmt)
        with fused_resnet.use_backend("reference"):
            assert relative_error(fused(x), plain(x)) > 1e-3
        fused_resnet.prepare_for_inference(fused)
    with torch.no_grad():
        x = _x().to(memory_format=fmt)
        for path in ("features.denseblock1.denselayer2.norm1.running_var",
                     "features.denseblock2.denselayer1.norm2.weight"):
            for model in (plain, fused):
                model.get_parameter(path).mul_(1.5) if path.endswith("weight") else model.get_buffer(path).mul_(1.5)
            with pytest.warns(UserWarning, match="changed since prepare_for_inference"):
                out = fused(x)
            assert relative_error(out, plain(x)) <= FP64_MODEL_TOL
            fused_resnet.prepare_for_inference(fused)
            assert relative_error(fused(x), plain(x)) <= FP64_MODEL_TOL
    assert not [k for b in copy.deepcopy(fused).modules() for k in b.__dict__ if k.startswith("_prepared")]
    fused.train()
    assert not [k for b in fused.modules() for k in b.__dict__ if k.startswith("_prepared")]
    fused_resnet.prepare_for_inference(fused)
    fused_resnet.unfuse(fused)
    assert not [k for b in fused.modules() for k in b.__dict__ if k.startswith("_prepared")]
