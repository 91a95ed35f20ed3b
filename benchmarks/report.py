"""Turn benchmark JSON(s) into a ratio table (fused vs eager, fused vs torch.compile), a PNG bar
chart and, when the roofs were measured (``test_kernels.py``), each fused kernel's fraction of its
roofline floor.

    python benchmarks/report.py results.json [more.json ...] [--out DIR]

Writes ``DIR/ratios.md`` and ``DIR/speedup.png`` (default: beside the first JSON) and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json file(s), or bench's JSON")
    parser.add_argument("--out", help="output folder (default: the first JSON's folder)")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # run from a source checkout without installing
    from fused_resnet.benchmark.report import write_report

    try:
        text, png = write_report(args.json, args.out)
    except (OSError, ValueError, KeyError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    print(text)
    out = Path(args.out) if args.out else Path(args.json[0]).parent
    print(f"wrote {out / 'ratios.md'}" + (f" and {png}" if png else " (no block/model results: no chart)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
