"""``python -m fused_resnet <command>``: each command lives in ``fused_resnet/cli/<command>.py``,
which defines ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "check": "check the fused ops and a small fused ResNet against the reference on every backend",
    "info": "print versions, device and which backends are available (and why not)",
    "bench": "time fused vs eager vs torch.compile side by side, with a table and a chart",
    "train": "train a fused ResNet on a real dataset (digits by default, or CIFAR-10 from a folder)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fused_resnet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(f"fused_resnet.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fused_resnet.cli.{name}":
                raise
            command.set_defaults(run=lambda args, n=name: _missing(n))
            continue
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def _missing(name: str) -> int:
    print(f"fused_resnet: the '{name}' command is not part of this installation", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
