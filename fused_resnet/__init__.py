"""fused_resnet: fused conv + BatchNorm + ReLU and residual add + ReLU for ResNets.

Swap blocks with :func:`fuse` (in place, same parameters and ``state_dict``), build fused models
with :func:`resnet18` / :func:`resnet34` / :func:`resnet50`, or call the functional ops in
:mod:`fused_resnet.ops`. Which implementation runs is chosen per call: see :func:`use_backend`.
"""

# The kernel subpackage ``fused_resnet.backends`` is imported first so that the public function
# ``fused_resnet.backends()`` below, and not the subpackage, is what the name is bound to.
from . import backends as _backend_packages  # noqa: F401
from . import fx, ops
from ._backend import (
    BackendUnavailableError,
    backends,
    get_backend,
    set_backend,
    trace_dispatch,
    use_backend,
)
from .fuse import find_fusable, fuse, fusion_report
from .inference import prepare_for_inference
from .models import ResNet, resnet18, resnet34, resnet50, resnet101, resnext50_32x4d, wide_resnet50_2
from .modules import FusedBasicBlock, FusedBottleneck
from .unfuse import unfuse

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FusedBasicBlock",
    "FusedBottleneck",
    "ResNet",
    "backends",
    "find_fusable",
    "fuse",
    "fusion_report",
    "fx",
    "get_backend",
    "ops",
    "prepare_for_inference",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
    "set_backend",
    "trace_dispatch",
    "unfuse",
    "use_backend",
    "wide_resnet50_2",
]
