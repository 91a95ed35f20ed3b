"""``python -m fused_resnet bench`` and the benchmark machinery it shares with ``benchmarks/``:
argument handling, a tiny real run, the variants computing the same thing, timing helpers, and
the ratio / roofline report on a JSON made here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fused_resnet.__main__ import build_parser, main
from fused_resnet._tolerances import assert_close
from fused_resnet.benchmark import timing
from fused_resnet.benchmark.cases import BLOCKS, Sizes, Variant, prepare_block, skip_reason, variants
from fused_resnet.benchmark.kernels import KERNELS, cost, prepare_kernel
from fused_resnet.benchmark.report import ratio_rows, roofline_rows, write_report
from fused_resnet.cli.bench import select_variants

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
TINY = Sizes(batch=2, image=32, dtype=torch.float32)
CPU = torch.device("cpu")


def parse(*argv):
    return build_parser().parse_args(["bench", *argv])


def test_defaults_and_variant_selection():
    args = parse()
    assert (args.model, args.batch, args.dtype, args.mode) == ("resnet18", None, None, "both")
    names = [v.name for v in select_variants(args, "cpu")]
    assert names[:2] == ["eager", "eager_cl"] and "fused_reference" in names
    assert not any(n.startswith("compile") for n in names)  # off on the CPU unless asked
    assert "compile" in [v.name for v in select_variants(parse("--compile"), "cpu")]
    assert [v.name for v in select_variants(parse("--variants", "fused_reference,eager"), "cpu")] == [
        "eager", "fused_reference"]
    assert "compile" in [v.name for v in select_variants(parse(), "cuda")]


def test_triton_is_never_benchmarked_on_the_cpu():
    assert all(v.backend != "triton" for v in variants("cpu"))


@pytest.mark.parametrize("argv", [["--model", "vgg16"], ["--batch", "0"], ["--dtype", "fp8"], ["--mode", "x"]])
def test_bad_arguments_are_rejected(argv):
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2


def test_unknown_variant_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--variants", "eager,warp_speed", "--out", str(tmp_path)]) == 2
    assert "unknown variant(s) warp_speed" in capsys.readouterr().err


def test_cpu_compile_skips_are_explained():
    compiled = Variant("compile", False, True, "default")
    assert skip_reason(compiled, "cpu", "basic-l2.0-ds") is None
    assert "FUSED_RESNET_BENCH_COMPILE_ALL" in skip_reason(compiled, "cpu", "resnet50")
    assert skip_reason(compiled, "cuda", "resnet50") is None
    assert skip_reason(Variant("eager", False, False), "cpu", "resnet50") is None


def test_tiny_bench_run_writes_json_table_and_chart(tmp_path, capsys):
    argv = ["bench", "--batch", "2", "--image-size", "32", "--rounds", "2", "--mode", "eval",
            "--variants", "eager,fused_reference", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| resnet18 | eval | fused_reference |" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    info = data["machine_info"]
    for key in ("device", "torch", "fused_resnet", "triton", "torch_num_threads", "fused_backends", "dtype", "batch"):
        assert key in info
    assert info["device"] == "cpu" and info["batch"] == 2
    assert {b["extra_info"]["variant"] for b in data["benchmarks"]} == {"eager", "fused_reference"}
    for b in data["benchmarks"]:
        assert b["stats"]["rounds"] == 2 and b["stats"]["median"] > 0
        assert b["extra_info"]["images_per_s"] == pytest.approx(2 / b["stats"]["median"])
    assert (tmp_path / "speedup.png").stat().st_size > 5_000
    assert "fused_reference" in (tmp_path / "ratios.md").read_text()


def _fixture_json(path: Path) -> dict:
    """A benchmark JSON in pytest-benchmark's layout, with block, kernel and roof entries."""
    def entry(kind, median, **info):
        return {"name": f"{kind}-{info.get('variant')}", "extra_info": {"kind": kind, **info},
                "stats": {"median": median}}

    benchmarks = [
        entry("block", 4e-3, case="basic-l1", mode="train", variant="eager", images_per_s=500.0,
              peak_memory_bytes=1000, saved_activation_bytes=800),
        entry("block", 3e-3, case="basic-l1", mode="train", variant="eager_cl", images_per_s=666.0,
              peak_memory_bytes=900, saved_activation_bytes=800),
        entry("block", 2.5e-3, case="basic-l1", mode="train", variant="compile", images_per_s=800.0),
        entry("block", 2e-3, case="basic-l1", mode="train", variant="fused_native", images_per_s=1000.0,
              peak_memory_bytes=600, saved_activation_bytes=400),
        entry("peaks", 1.0, matmul_flops_per_s=5e14, copy_bytes_per_s=2e12, matmul_dtype="bfloat16"),
        entry("kernel", 1e-4, case="basic-l1", kernel="conv_stats", variant="fused_native", flops=4e10, bytes=1e8),
        entry("kernel", 1e-4, case="basic-l1", kernel="bn_add_relu", variant="fused_native", flops=1e6, bytes=1.5e8),
    ]
    data = {"machine_info": {"device": "cuda", "gpu_name": "Test GPU", "torch": torch.__version__},
            "benchmarks": benchmarks}
    path.write_text(json.dumps(data))
    return data


def test_report_ratios_and_roofline(tmp_path):
    data = _fixture_json(tmp_path / "fixture.json")
    by_variant = {b["extra_info"]["variant"]: b for b in data["benchmarks"] if b["extra_info"]["kind"] == "block"}
    (row,) = ratio_rows(data)
    fused = by_variant["fused_native"]["stats"]["median"]
    assert row["vs_eager"] == pytest.approx(by_variant["eager"]["stats"]["median"] / fused)
    assert row["vs_eager_cl"] == pytest.approx(by_variant["eager_cl"]["stats"]["median"] / fused)
    assert row["vs_compile"] == pytest.approx(by_variant["compile"]["stats"]["median"] / fused)
    assert row["peak_memory_bytes_ratio"] == pytest.approx(600 / 900)
    assert row["saved_activation_bytes_ratio"] == pytest.approx(400 / 800)
    peaks = next(b["extra_info"] for b in data["benchmarks"] if b["extra_info"]["kind"] == "peaks")
    rows = {r["kernel"]: r for r in roofline_rows(data)}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if info["kind"] != "kernel":
            continue
        floor = max(info["flops"] / peaks["matmul_flops_per_s"], info["bytes"] / peaks["copy_bytes_per_s"])
        assert rows[info["kernel"]]["fraction"] == pytest.approx(floor / b["stats"]["median"])
    assert rows["conv_stats"]["bound"] == "compute" and rows["bn_add_relu"]["bound"] == "memory"
    text, png = write_report(tmp_path / "fixture.json", tmp_path / "report")
    assert "fraction of floor" in text and "Test GPU" in text and png.exists()


def _report_script():
    spec = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_script(tmp_path, capsys):
    _fixture_json(tmp_path / "a.json")
    script = _report_script()
    assert script.main([str(tmp_path / "a.json"), "--out", str(tmp_path / "r")]) == 0
    assert "| basic-l1 | train | fused_native |" in capsys.readouterr().out
    assert (tmp_path / "r" / "speedup.png").exists() and (tmp_path / "r" / "ratios.md").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert script.main([str(bad)]) == 2
    assert "not a benchmark JSON" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("shape", [BLOCKS[1], BLOCKS[7]], ids=lambda s: s.name)
def test_variants_compute_the_same_block(shape, mode):
    """What is timed is the same computation in every variant: eager vs fused (reference backend)."""
    outs = {}
    for variant in (Variant("eager", False, False), Variant("fused_reference", True, True, backend="reference")):
        prepared = prepare_block(shape, variant, mode, TINY, CPU)
        outs[variant.name] = prepared.fn()
    a, b = outs["eager"], outs["fused_reference"]
    for x, y in zip((a,) if mode == "eval" else a, (b,) if mode == "eval" else b):
        assert_close(y, x)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [BLOCKS[1], BLOCKS[8]], ids=lambda s: s.name)
def test_kernel_cases_run_and_have_costs(shape, kernel):
    prepared = prepare_kernel(kernel, shape, "reference", TINY, CPU)
    out = prepared.fn()
    tensors = [t for t in (out if isinstance(out, tuple) else (out,)) if t.numel()]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)
    c = cost(kernel, shape, TINY)
    assert c.flops > 0 and c.bytes > 0


def test_median_seconds_counts_calls_and_saved_bytes_excludes():
    calls = []
    median, samples = timing.median_seconds(lambda: calls.append(1), rounds=4, iterations=3, warmup=2)
    assert len(calls) == (4 + 2) * 3 and len(samples) == 4 and median >= 0
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64, requires_grad=True)
    total = timing.saved_activation_bytes(lambda: (x @ w).sum())
    assert total == x.untyped_storage().nbytes() + w.untyped_storage().nbytes()
    assert timing.saved_activation_bytes(lambda: (x @ w).sum(), [w]) == x.untyped_storage().nbytes()
    assert timing.peak_memory_bytes(lambda: None, CPU) is None


def test_kernels_only_report_has_roofline_and_no_chart(tmp_path):
    data = _fixture_json(tmp_path / "all.json")
    data["benchmarks"] = [b for b in data["benchmarks"] if b["extra_info"]["kind"] in ("kernel", "peaks")]
    (tmp_path / "kernels.json").write_text(json.dumps(data))
    text, png = write_report(tmp_path / "kernels.json", tmp_path / "k")
    assert png is None and not (tmp_path / "k" / "speedup.png").exists()
    assert "fraction of floor" in text and "conv_stats" in text
