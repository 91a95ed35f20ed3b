"""GPU checks of the whole stack (skipped without CUDA): every available backend in a fused model,
autocast, CUDA-graph capture of a training step and torch.compile with inductor."""

import copy

import pytest
import torch

import fused_resnet
from fused_resnet._tolerances import assert_close, relative_error

from _tv_resnet import tv_resnet18, tv_resnet50

pytestmark = pytest.mark.cuda


def _models(ctor=tv_resnet18, dtype=torch.float32):
    plain = ctor(width=16).cuda().to(dtype=dtype, memory_format=torch.channels_last)
    return plain, fused_resnet.fuse(copy.deepcopy(plain))


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("backend", ["auto", "reference", "triton", "native"])
@pytest.mark.parametrize("ctor", [tv_resnet18, tv_resnet50], ids=["resnet18", "resnet50"])
def test_fused_model_train_step_on_gpu(backend, ctor):
    if backend not in ("auto", *fused_resnet.backends("cuda")):
        pytest.skip(f"{backend} not available: {fused_resnet._backend.unavailable_reason(backend, 'cuda')}")
    plain, fused = _models(ctor)
    x = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with fused_resnet.use_backend(backend):
        out_f = fused(x)
        out_f.square().mean().backward()
    out_p = plain(x)
    out_p.square().mean().backward()
    assert_close(out_f, out_p, tol=1e-4, name="output")
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert_close(q.grad, p.grad, tol=1e-4, name=name)
    for (name, b), c in zip(plain.named_buffers(), fused.buffers()):
        if b.is_floating_point():
            assert_close(c, b, tol=1e-4, name=name)


def test_bf16_autocast_no_worse_than_twice_eager():
    plain, fused = _models()
    oracle = copy.deepcopy(plain).double()
    x = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    want = oracle(x.double())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager, got = plain(x), fused(x)
    eager_err = relative_error(eager, want)
    assert relative_error(got, want) <= max(2 * eager_err, 1e-3)


def test_cuda_graph_capture_of_a_training_step():
    _, fused = _models()
    opt = torch.optim.SGD(fused.parameters(), lr=0.01)
    static_x = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = fused(static_x).square().mean()
        loss.backward()
        opt.step()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up, also lets autotuners settle outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    before = fused.layer1[0].bn1.num_batches_tracked.item()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(static_loss).item()
    assert fused.layer1[0].bn1.num_batches_tracked.item() == before + 1


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_inductor_fullgraph(train):
    torch._dynamo.reset()
    plain, fused = _models()
    plain.train(train), fused.train(train)
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    compiled = torch.compile(fused, fullgraph=True)
    assert_close(compiled(x), plain(x), tol=1e-4)
