"""The commands of ``python -m fused_resnet``, one module each (see ``fused_resnet/__main__.py``)."""

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value
