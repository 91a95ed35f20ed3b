"""Which implementation runs each kernel: the backend registry and the per-call choice.

A backend is a set of kernels, one per kernel name of ``_library.SCHEMAS``, each with the exact
signature of the matching function in ``reference.py`` and an optional ``supports(*args)``
predicate. Backends plug in by calling :func:`register_backend` and :func:`register_kernel` from
their own module (``fused_resnet/backends/<name>``); nothing else in the package names them.

The choice, per call: the backend asked for (``use_backend`` > ``set_backend`` >
``FUSED_RESNET_BACKEND`` > ``auto``). ``auto`` takes the first available backend of
``AUTO_ORDER`` for the tensors' device whose kernel supports the arguments, else the reference.
A named backend that is not available raises :class:`BackendUnavailableError`; a named backend
whose kernel does not support the arguments (dtype, groups, dilation...) falls back to the
reference, so no call ever returns a different answer for lack of a kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import _extension, reference

BACKEND_NAMES = ("auto", "reference", "triton", "native")
# Backends tried by "auto", fastest first; the reference closes every list implicitly.
AUTO_ORDER = {"cuda": ("native", "triton"), "cpu": ("native",)}
_BACKEND_MODULES = {"triton": "fused_resnet.backends.triton", "native": "fused_resnet.backends.native"}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why and how to fix it."""


@dataclass
class Kernel:
    fn: Callable
    supports: Callable[..., bool] | None = None


@dataclass
class Backend:
    name: str
    # device type -> None when usable there, else the reason it is not.
    availability: Callable[[str], str | None]
    kernels: dict[str, Kernel] = field(default_factory=dict)


_registry: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}
_availability: dict[tuple[str, str], str | None] = {}
_loaded = False
_default = os.environ.get("FUSED_RESNET_BACKEND", "auto")
if _extension.C is not None and _default in BACKEND_NAMES:
    _extension.C._set_default_backend(BACKEND_NAMES.index(_default))
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fused_resnet_backend", default=None)
# Process-wide, not a ContextVar: CUDA backward passes run on autograd's device threads, which
# would not see a context set by the thread that called trace_dispatch.
_traces: list[list[tuple[str, str]]] = []


def register_backend(name: str, availability: Callable[[str], str | None]) -> Backend:
    """Declare backend ``name``; ``availability(device_type)`` returns None or why it cannot run."""
    backend = _registry.setdefault(name, Backend(name, availability))
    backend.availability = availability
    for key in [k for k in _availability if k[0] == name]:
        del _availability[key]
    return backend


def register_kernel(backend: str, kernel: str, supports: Callable[..., bool] | None = None):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``kernel``."""

    def decorate(fn: Callable) -> Callable:
        _registry[backend].kernels[kernel] = Kernel(fn, supports)
        return fn

    return decorate


def _load_backends() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name, module in _BACKEND_MODULES.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # an optional backend must never break the package
            _load_errors[name] = f"{type(exc).__name__}: {exc}"


def _check_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown fused_resnet backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    return name


def unavailable_reason(name: str, device_type: str) -> str | None:
    """None if backend ``name`` can run on ``device_type`` here, else the reason it cannot."""
    if name in ("auto", "reference"):
        return None
    _load_backends()
    if name in _load_errors:
        return f"failed to load: {_load_errors[name]}"
    if name not in _registry:
        return "not installed"
    key = (name, device_type)
    if key not in _availability:  # fixed once a backend is loaded; asked on every op call
        _availability[key] = _registry[name].availability(device_type)
    return _availability[key]


def backends(device_type: str | None = None) -> list[str]:
    """Names of the concrete backends usable here (on ``device_type``; default: cuda if present)."""
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return [n for n in BACKEND_NAMES[1:] if unavailable_reason(n, device_type) is None]


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``auto``, ``reference``, ``triton`` or ``native``)."""
    global _default
    _default = _check_name(name)
    if _extension.C is not None:  # the extension's copy of the choice: its kernels choose in C++
        _extension.C._set_default_backend(BACKEND_NAMES.index(_default))


def get_backend() -> str:
    """The backend name in force for the current context."""
    return _override.get() or _check_name(_default)


def in_force() -> str:
    """:func:`get_backend` without validating the name (both were validated when set): for per-call
    checks on hot paths (a prepared conv's)."""
    return _override.get() or _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run fused ops with backend ``name`` inside the block (thread/task local)."""
    token = _override.set(_check_name(name))
    native = _extension.C
    before = native._thread_backend() if native is not None else -1
    if native is not None:
        native._set_thread_backend(BACKEND_NAMES.index(name))
    try:
        yield
    finally:
        _override.reset(token)
        if native is not None:
            native._set_thread_backend(before)


@contextlib.contextmanager
def trace_dispatch() -> Iterator[list[tuple[str, str]]]:
    """Context manager yielding a list that collects ``(kernel, backend)`` for every kernel run
    while it is open, in any thread (backward passes included)."""
    log: list[tuple[str, str]] = []
    _traces.append(log)
    if _extension.C is not None:  # the extension's kernels report through this hook while a trace is open
        _extension.C._set_trace_hook(record)
    try:
        yield log
    finally:
        _traces.remove(log)
        if not _traces and _extension.C is not None:
            _extension.C._set_trace_hook(None)


def select(kernel: str, device_type: str, args: tuple, name: str | None = None) -> tuple[str, Callable]:
    """The backend name and function that run ``kernel`` on ``args`` (tensors on ``device_type``):
    backend ``name`` when given (a backward pass runs on the backend its forward asked for), else
    the one in force (:func:`get_backend`)."""
    name = _check_name(name) if name else get_backend()
    if name == "auto":
        candidates = AUTO_ORDER.get(device_type, ())
    elif name == "reference":
        candidates = ()
    else:
        reason = unavailable_reason(name, device_type)
        if reason is not None:
            raise BackendUnavailableError(
                f"fused_resnet backend {name!r} cannot run on {device_type}: {reason}. "
                f"Run `python -m fused_resnet info` for details, or use_backend('auto')."
            )
        candidates = (name,)
    chosen, fn = "reference", getattr(reference, kernel)
    for candidate in candidates:
        if unavailable_reason(candidate, device_type) is not None:
            continue
        impl = _registry[candidate].kernels.get(kernel)
        if impl is not None and (impl.supports is None or impl.supports(*args)):
            chosen, fn = candidate, impl.fn
            break
    record(kernel, chosen)
    return chosen, fn


def record(kernel: str, backend: str) -> None:
    """Note in every open :func:`trace_dispatch` that ``backend`` ran ``kernel`` (for callers that
    bound a kernel once, e.g. a prepared conv, and call it without :func:`select`)."""
    for log in _traces:
        log.append((kernel, backend))
