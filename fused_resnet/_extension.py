"""The compiled extension, loaded once, never raising: the library ``fused_resnet/_C_ops.so`` (the ops'
schemas, kernels, backend choice and autograd; no Python in it) through the pybind module
``fused_resnet._C``, which links it and installs its hooks into Python (sources in ``csrc/``).

Loading it defines the public ops (their schemas are generated at build time from ``_library.SCHEMAS``,
which :func:`library` checks them against) and registers their native CPU (and CUDA) kernels with the
backend choice in front of them, and their autograd (docs/design.md). It is required to run the ops:
without it they raise an error that says how to build it.
"""

from __future__ import annotations

import torch

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"


def _refuse(module, reason: str) -> None:
    """Loaded but unusable (another torch's C++ ABI, other schemas): its kernels are registered, so every
    call is sent to Python (the reference backend's choice), which refuses with the reason."""
    def refuse(*args):
        raise RuntimeError(f"fused_resnet: the ops need the compiled extension: {reason}")

    module._set_python_kernels(refuse)
    module._set_default_backend(1)


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
        reason = f"the extension was built against torch {built} but torch {running} is running; {BUILD_HINT}"
        _refuse(_C, reason)
        return None, reason
    return _C, None


C, LOAD_ERROR = _load()


def require() -> None:
    """Raise the reason the ops cannot run here, if the extension is missing."""
    if C is None:
        raise RuntimeError(f"fused_resnet: the ops need the compiled extension: {LOAD_ERROR}")


def defined_schemas(namespace: str, names=None) -> dict[str, str]:
    """The schemas of the ops defined now in ``namespace`` (by _C_ops or by Python), by op name, as torch
    prints them (``name(Tensor x, ...) -> Tensor``, without the namespace): those of ``names`` that exist,
    or all of them (listing every op of the process: ~30 ms, for the tests)."""
    prefix = namespace + "::"
    if names is None:
        names = [n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)]
    schemas = {}
    for name in names:
        try:
            schemas[name] = str(torch._C._get_schema(prefix + name, ""))[len(prefix):]
        except RuntimeError:  # not defined
            pass
    return schemas


def _normal(namespace: str, name: str, schema: str) -> str:
    return str(torch._C.parse_schema(f"{namespace}::{name}{schema}"))[len(namespace) + 2:]


def library(namespace: str, schemas: dict[str, str]) -> torch.library.Library:
    """The Library through which Python registers the ops' fakes and Python kernels. _C_ops defines the
    schemas (generated from ``schemas`` at build time); Python defines them only when no library did
    (extension not built) or those it lacks. A library whose schemas differ from ``schemas`` (built from
    other sources) is refused like one built for another torch (an op it has beyond them is left to
    tests/test_c_ops.py, which compares the whole namespace)."""
    global C, LOAD_ERROR
    defined = defined_schemas(namespace, schemas)
    lib = torch.library.Library(namespace, "DEF" if not defined else "FRAGMENT")
    differ = [n for n in schemas if defined.get(n) != _normal(namespace, n, schemas[n])]
    for name, schema in schemas.items():
        if name not in defined:
            lib.define(name + schema)
    if defined and differ and C is not None:
        LOAD_ERROR = (f"the extension's ops differ from fused_resnet/_library.py's SCHEMAS ({', '.join(differ)}): "
                      f"it was built from other sources; {BUILD_HINT}")
        _refuse(C, LOAD_ERROR)
        C = None
    return lib
