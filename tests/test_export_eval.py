"""A fused model in eval leaves Python through the usual doors: under torch.export, torch.jit.trace
and both ONNX exporters it emits plain ATen (conv2d with the BN folded, add, relu), equal to the
unfused model; in training, torch.export keeps the fused ops."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fused_resnet
from fused_resnet import models
from fused_resnet._tolerances import assert_close

F32 = torch.float32


def _pair(memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    plain = models.resnet18(fused=False, num_classes=10).to(memory_format=memory_format)
    with torch.no_grad():  # non-trivial BN statistics, so that a BN applied twice or not at all shows
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0), m.bias.normal_(0, 0.2)
    return plain.eval(), fused_resnet.fuse(copy.deepcopy(plain)).eval()


def _fused_ops(graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op == "call_function" and "fused_resnet" in str(n.target)}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_torch_export_in_eval_is_plain_aten(memory_format):
    plain, fused = _pair(memory_format)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=memory_format)
    program = torch.export.export(fused, (x,))
    assert _fused_ops(program.graph) == set()
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.conv2d.default" in targets
    with torch.no_grad():
        assert_close(program.module()(x), plain(x), F32, name="exported")


def test_torch_export_in_training_keeps_the_fused_ops():
    _, fused = _pair()
    fused.train()
    program = torch.export.export(fused, (torch.randn(2, 3, 32, 32),))
    assert "fused_resnet.conv_bn.default" in _fused_ops(program.graph)


def test_jit_trace_in_eval_is_plain_aten_and_prepared_state_is_not_traced():
    plain, fused = _pair()
    fused_resnet.prepare_for_inference(fused)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(fused, x)
        assert "fused_resnet::" not in str(traced.inlined_graph)  # no op of ours (class names aside)
        assert_close(traced(x), plain(x), F32, name="traced")
        # The trace reads the parameters, not a preparation: it follows later changes of them.
        for model in (plain, fused):
            model.layer2[0].bn1.running_var.mul_(1.7)
        assert_close(traced(x), plain(x), F32, name="traced after a BN change")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
def test_onnx_export_runs_in_onnxruntime_like_the_unfused_model(dynamo, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    plain, fused = _pair()
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "model.onnx"
    if dynamo:
        torch.onnx.export(fused, (x,), dynamo=True).save(str(path))
    else:
        buffer = io.BytesIO()
        torch.onnx.export(fused, (x,), buffer, dynamo=False)
        path.write_bytes(buffer.getvalue())
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "Conv" in ops and "Relu" in ops and "BatchNormalization" not in ops
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), "non-standard ONNX ops"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert_close(torch.from_numpy(got), plain(x), F32, name="onnxruntime")
