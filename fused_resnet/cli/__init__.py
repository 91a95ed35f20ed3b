"""The commands of ``python -m fused_resnet``, one module each (see ``fused_resnet/__main__.py``)."""
