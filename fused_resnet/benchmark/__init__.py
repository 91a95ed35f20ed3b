"""Benchmark machinery shared by ``benchmarks/`` (pytest-benchmark) and ``python -m fused_resnet bench``:
the shape table and the variants compared (:mod:`.cases`), device-correct timing and memory
measurement (:mod:`.timing`), and the ratio table, chart and roofline report (:mod:`.report`)."""
