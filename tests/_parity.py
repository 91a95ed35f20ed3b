"""Shared by the fuse tests on whole models: a non-trivial BN state, and one step of a plain and a
fused model compared output by output, gradient by gradient, buffer by buffer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fused_resnet._tolerances import relative_error, tolerance

FP64_MODEL_TOL = 1e-9  # the bar for whole fused models in fp64


def randomize_bns(model: nn.Module) -> nn.Module:
    """BN weights, biases and running statistics away from their (1, 0, 0, 1) init: with those a
    BN's output has an exactly zero batch mean, and the next BN's running mean is pure rounding."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def grad_errors(plain: nn.Module, fused: nn.Module) -> dict[str, float]:
    """Relative error of every parameter's gradient. A gradient that is zero in exact arithmetic (a
    BN bias feeding, through 1x1 convs only, BNs in training, which remove any constant) is
    rounding noise in both models: its error is taken relative to 1e-6 of the largest gradient."""
    grads = [p.grad.norm().item() for p in plain.parameters() if p.grad is not None]
    floor = 1e-6 * max(grads, default=0.0)
    errors = {}
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        errors[name] = (q.grad - p.grad).double().norm().item() / max(p.grad.norm().item(), floor)
    return errors


def step_errors(plain: nn.Module, fused: nn.Module, x: torch.Tensor, train: bool) -> dict[str, float]:
    """One forward + backward of each in ``train`` mode (the same random draws for dropout, drop
    path, DropBlock); the relative error of the output, every gradient and every float buffer."""
    plain.train(train), fused.train(train)
    torch.manual_seed(1234)
    out_p = plain(x)
    torch.manual_seed(1234)
    out_f = fused(x)
    out_p.square().sum().backward()
    out_f.square().sum().backward()
    errors = {"output": relative_error(out_f, out_p)}
    errors.update({f"grad {k}": v for k, v in grad_errors(plain, fused).items()})
    for (name, b), c in zip(plain.named_buffers(), fused.buffers()):
        if b.is_floating_point():
            errors[name] = relative_error(c, b)
        else:
            assert torch.equal(c, b), name
    plain.zero_grad(), fused.zero_grad()
    return errors


def assert_step_matches(plain: nn.Module, fused: nn.Module, x: torch.Tensor, train: bool,
                        tol: float = FP64_MODEL_TOL) -> float:
    errors = step_errors(plain, fused, x, train)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: relative error {errors[worst]:.3e} exceeds {tol:.1e}"
    return errors[worst]


def assert_fp32_within_eager(plain: nn.Module, fused: nn.Module, gold: nn.Module, x: torch.Tensor,
                             factor: float = 3.0) -> None:
    """One forward + backward of the fp32 ``plain`` and ``fused`` models and their fp64 copy ``gold``:
    the fused output and every fused gradient within ``factor`` x eager fp32's own error vs fp64
    (plus the fp32 tolerance); gradients are left in place (callers zero them)."""
    outs = [m(x.to(d)) for m, d in ((plain, torch.float32), (fused, torch.float32), (gold, torch.float64))]
    for out in outs:
        out.square().sum().backward()
    slack = tolerance(torch.float32)
    assert relative_error(outs[1], outs[2]) <= factor * relative_error(outs[0], outs[2]) + slack
    eager, ours = grad_errors(gold, plain), grad_errors(gold, fused)
    for name, err in ours.items():
        assert err <= factor * eager[name] + slack, name


def assert_native_fp32_train_and_eval(plain: nn.Module, x: torch.Tensor) -> None:
    """``plain`` (fp32) fused, on the native backend: a training step within 3x eager fp32's error vs
    fp64 (output, every gradient), then eval and prepared eval within the same bound on the output."""
    import copy

    import fused_resnet

    fused, gold = fused_resnet.fuse(copy.deepcopy(plain)), copy.deepcopy(plain).to(torch.float64)
    with fused_resnet.use_backend("native"):
        assert_fp32_within_eager(plain, fused, gold, x)
    for model in (plain, fused, gold):
        model.eval()
    prepared = fused_resnet.prepare_for_inference(copy.deepcopy(fused))
    with fused_resnet.use_backend("native"), torch.no_grad():
        want, eager_out = gold(x.double()), plain(x)
        bound = 3 * relative_error(eager_out, want) + tolerance(torch.float32)
        for name, model in (("eval", fused), ("prepared", prepared)):
            assert relative_error(model(x), want) <= bound, name


def assert_fp64_train_eval_prepared(plain: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    """fp64 on the reference backend: a training step and an eval step match (``assert_step_matches``),
    then ``fused`` prepared for inference matches ``plain`` in eval."""
    import fused_resnet

    with fused_resnet.use_backend("reference"):
        for train in (True, False):
            assert_step_matches(plain, fused, x, train)
        plain.eval()
        prepared = fused_resnet.prepare_for_inference(fused.eval())
        with torch.no_grad():
            assert relative_error(prepared(x), plain(x)) <= FP64_MODEL_TOL
