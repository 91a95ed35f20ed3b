"""The compiled extension ``fused_resnet._C`` (sources in ``csrc/``), loaded once, never raising.

Importing it registers, for the public ops that ``_library.py`` declares, their native CPU (and
CUDA) kernels with the backend choice in front of them, and their autograd (docs/design.md). It is
required to run the ops: without it they raise an error that says how to build it.
"""

from __future__ import annotations

import torch

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"


def _load():
    """The extension module and None, or None and why it could not be loaded."""
    try:
        from . import _C
    except ModuleNotFoundError as exc:
        return None, f"the extension fused_resnet._C is not built ({exc}); {BUILD_HINT}"
    except Exception as exc:  # noqa: BLE001  (undefined symbols, ABI mismatch, missing libraries: any reason)
        return None, (
            f"the extension fused_resnet._C failed to load ({type(exc).__name__}: {exc}); rebuild it against "
            f"torch {torch.__version__}: {BUILD_HINT}"
        )
    built = getattr(_C, "TORCH_VERSION", None)
    running = torch.__version__.split("+")[0]
    if built is not None and built != running:
        # Importing it registered its kernels already, but its C++ ABI is another torch's: every call
        # is sent to Python (the reference backend's choice), which refuses with the reason.
        reason = f"the extension was built against torch {built} but torch {running} is running; {BUILD_HINT}"

        def refuse(*args):
            raise RuntimeError(f"fused_resnet: the ops need the compiled extension: {reason}")

        _C._set_python_kernels(refuse)
        _C._set_default_backend(1)
        return None, reason
    return _C, None


C, LOAD_ERROR = _load()


def require() -> None:
    """Raise the reason the ops cannot run here, if the extension is missing."""
    if C is None:
        raise RuntimeError(f"fused_resnet: the ops need the compiled extension: {LOAD_ERROR}")
