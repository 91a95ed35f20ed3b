"""From a benchmark JSON (pytest-benchmark's ``--benchmark-json`` format, which ``bench`` also
writes) to a table of ratios, a PNG bar chart and, when the roofs were measured, each fused
kernel's fraction of its roofline floor.

Each result's ``extra_info`` names its ``case``, ``mode`` and ``variant`` (``kind`` is ``block``,
``model``, ``kernel`` or ``peaks``). Speedups are ``t_baseline / t_fused`` of the medians, so 2.0
means twice the images per second; memory ratios are ``fused / baseline`` (below 1 is leaner).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .._charts import grouped_bars

BASELINES = ("eager", "eager_cl")


def load(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{path}: not a benchmark JSON (no 'benchmarks' list)")
    return data


def merge(paths) -> dict:
    """Several benchmark JSONs (e.g. blocks, models and kernels run separately) as one: the
    machine information of the first, the results of all."""
    datas = [load(p) for p in paths]
    if not datas:
        raise ValueError("no benchmark JSON given")
    merged = dict(datas[0])
    merged["benchmarks"] = [b for d in datas for b in d["benchmarks"]]
    return merged


def _median(bench: dict) -> float:
    return float(bench["stats"]["median"])


def results(data: dict) -> dict[tuple[str, str], dict[str, dict]]:
    """``{(case, mode): {variant: benchmark}}`` for the block and model results."""
    table: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("kind") in ("block", "model"):
            table[(info["case"], info["mode"])][info["variant"]] = bench
    return dict(table)


def _compile_best(variants: dict[str, dict]) -> dict | None:
    compiled = [b for name, b in variants.items() if name.startswith("compile")]
    return min(compiled, key=_median) if compiled else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def ratio_rows(data: dict) -> list[dict]:
    """One row per (case, mode, fused variant): times, images/s and the ratios against the baselines."""
    rows = []
    for (case, mode), variants in results(data).items():
        best_compile = _compile_best(variants)
        for name, bench in variants.items():
            if not name.startswith("fused"):
                continue
            t = _median(bench)
            info = bench["extra_info"]
            row = {"case": case, "mode": mode, "variant": name, "ms": 1e3 * t,
                   "images_per_s": info.get("images_per_s")}
            for base in BASELINES:
                row[f"vs_{base}"] = _ratio(_median(variants[base]), t) if base in variants else None
            row["vs_compile"] = _ratio(_median(best_compile), t) if best_compile else None
            row["compile_variant"] = best_compile["extra_info"]["variant"] if best_compile else None
            for key in ("peak_memory_bytes", "saved_activation_bytes"):
                base = variants.get("eager_cl", variants.get("eager", {})).get("extra_info", {}).get(key)
                row[f"{key}_ratio"] = _ratio(info.get(key), base)
            rows.append(row)
    return rows


def ratio_table(data: dict) -> str:
    """The ratios as a markdown table."""
    lines = ["| case | mode | variant | ms | images/s | x eager | x eager_cl | x compile | peak mem | saved act |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ratio_rows(data):
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['variant']} | {r['ms']:.3f} | {_fmt(r['images_per_s'], ',.0f')} "
            f"| {_fmt(r['vs_eager'])} | {_fmt(r['vs_eager_cl'])} | {_fmt(r['vs_compile'])} "
            f"| {_fmt(r['peak_memory_bytes_ratio'])} | {_fmt(r['saved_activation_bytes_ratio'])} |"
        )
    lines.append("")
    lines.append("x eager / x eager_cl / x compile: speedup of the fused variant (baseline time / fused time; "
                 "> 1 is faster). peak mem, saved act: fused / eager_cl (< 1 is leaner).")
    return "\n".join(lines)


def chart(data: dict, path: str | Path, title: str = "") -> Path | None:
    """Every variant's speed relative to eager NCHW (1.0), grouped by case and mode (None when
    the JSON holds no block or model results, e.g. a kernels-only run)."""
    table = results(data)
    keys = sorted(table)
    if not keys:
        return None
    names: list[str] = []
    for variants in table.values():
        names.extend(n for n in variants if n not in names)
    series = {}
    for name in names:
        if name == "eager":
            continue  # the baseline: 1.0 everywhere, drawn as the vertical line
        values = []
        for key in keys:
            variants = table[key]
            values.append(_ratio(_median(variants["eager"]), _median(variants[name]))
                          if "eager" in variants and name in variants else None)
        series[name] = values
    machine = data.get("machine_info", {})
    device = machine.get("gpu_name") or machine.get("cpu", {}).get("brand_raw") or machine.get("processor", "")
    return grouped_bars([f"{c} {m}" for c, m in keys], series, path, ylabel="speed relative to eager NCHW (x)",
                        title=title or f"fused_resnet vs eager and torch.compile ({device})", reference_line=1.0,
                        log_scale=True)


def roofline_rows(data: dict) -> list[dict]:
    """Per kernel result: its floor ``max(flops / peak, bytes / bandwidth)`` over its median time."""
    peaks = next((b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("kind") == "peaks"),
                 None)
    if peaks is None:
        return []
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("kind") != "kernel":
            continue
        t = _median(bench)
        compute = info["flops"] / peaks["matmul_flops_per_s"]
        memory = info["bytes"] / peaks["copy_bytes_per_s"]
        rows.append({"case": info["case"], "kernel": info["kernel"], "variant": info["variant"], "us": 1e6 * t,
                     "bound": "compute" if compute >= memory else "memory",
                     "fraction": max(compute, memory) / t,
                     "tflops": info["flops"] / t / 1e12, "gbps": info["bytes"] / t / 1e9})
    return rows


def roofline_table(data: dict) -> str:
    rows = roofline_rows(data)
    if not rows:
        return ""
    peaks = next(b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("kind") == "peaks")
    lines = [(f"Roofs measured here: matmul {peaks['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s "
             f"({peaks.get('matmul_dtype', '?')}), copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s"), "",
             "| case | kernel | variant | us | bound | TFLOP/s | GB/s | fraction of floor |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['kernel']} | {r['variant']} | {r['us']:.1f} | {r['bound']} "
                     f"| {r['tflops']:.2f} | {r['gbps']:.0f} | {r['fraction']:.2f} |")
    return "\n".join(lines)


def machine_summary(data: dict) -> str:
    m = data.get("machine_info", {})
    keys = ("gpu_name", "device", "torch", "triton", "fused_resnet", "cuda", "cudnn", "torch_num_threads",
            "fused_backends", "dtype")
    return ", ".join(f"{k}={m[k]}" for k in keys if m.get(k) is not None)


def write_report(json_paths, out_dir: str | Path | None = None) -> tuple[str, Path | None]:
    """Write ``ratios.md`` (machine, ratio table, roofline table) and ``speedup.png`` beside the
    (first) JSON or in ``out_dir``; returns the markdown text and the PNG path."""
    paths = [json_paths] if isinstance(json_paths, (str, Path)) else list(json_paths)
    data = merge(paths)
    out = Path(out_dir) if out_dir else Path(paths[0]).parent
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"Machine: {machine_summary(data)}", "", ratio_table(data)]
    roof = roofline_table(data)
    if roof:
        parts += ["", roof]
    text = "\n".join(parts) + "\n"
    (out / "ratios.md").write_text(text)
    return text, chart(data, out / "speedup.png")
