"""``python -m fused_resnet info``: versions, device, and which backends can run here (and why not)."""

from __future__ import annotations

import platform


def add_arguments(parser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="device type (default: cuda if present)")


def _versions() -> list[tuple[str, str]]:
    import torch

    rows = [("python", platform.python_version()), ("torch", torch.__version__)]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except Exception as exc:  # triton is optional
        rows.append(("triton", f"not importable ({type(exc).__name__})"))
    rows.append(("CUDA (torch built with)", str(torch.version.cuda)))
    if torch.cuda.is_available():
        rows.append(("cuDNN", str(torch.backends.cudnn.version())))
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB"))
    else:
        rows.append(("GPU", "none visible"))
    return rows


def _triton_lines() -> list[str]:
    """The Triton backend's conv path setting and its measured per-shape choices."""
    try:
        from fused_resnet.backends import triton as triton_backend
    except Exception as exc:  # reported above as the backend's unavailability
        return [f"not loaded: {type(exc).__name__}"]
    return triton_backend.info_lines()


def _native_lines() -> list[str]:
    from fused_resnet.backends import native

    return native.info_lines()


def run(args) -> int:
    import torch

    import fused_resnet
    from fused_resnet import _backend

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"fused_resnet {fused_resnet.__version__}")
    for name, value in _versions():
        print(f"  {name:<24} {value}")
    print(f"\nbackends on {device} (current choice: {fused_resnet.get_backend()}; "
          f"auto order: {', '.join(_backend.AUTO_ORDER.get(device, ())) or '-'}, then reference)")
    for name in _backend.BACKEND_NAMES[1:]:
        reason = _backend.unavailable_reason(name, device)
        print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    print("\nnative backend:")
    for line in _native_lines():
        print(f"  {line}")
    print("\ntriton backend:")
    for line in _triton_lines():
        print(f"  {line}")
    return 0
