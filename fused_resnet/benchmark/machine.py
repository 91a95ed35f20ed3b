"""What benchmark numbers depend on, recorded in every JSON's ``machine_info``: ``device``,
``torch``, ``triton``, ``fused_resnet``, ``python``, ``torch_num_threads``, ``fused_backends``,
``variants``, ``dtype``, ``batch``, ``image_size`` and, on CUDA, ``gpu_name``,
``gpu_memory_bytes``, ``gpu_sm_count``, ``gpu_capability``, ``cuda``, ``cudnn``, ``driver``."""

from __future__ import annotations

import platform
import subprocess

import torch

from .._backend import backends
from .cases import Sizes, variants


def machine_info(device: torch.device, sizes: Sizes) -> dict:
    import fused_resnet

    info = {
        "device": device.type,
        "torch": torch.__version__,
        "fused_resnet": fused_resnet.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "torch_num_threads": torch.get_num_threads(),
        "fused_backends": backends(device.type),
        "variants": [v.name for v in variants(device.type)],
        "dtype": str(sizes.dtype).removeprefix("torch."),
        "batch": sizes.batch,
        "image_size": sizes.image,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory, gpu_sm_count=props.multi_processor_count,
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), driver=_driver_version())
    return info


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0] if out.returncode == 0 and lines else None
