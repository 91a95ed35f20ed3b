"""Per-shape choice between the Triton backend's two conv paths, from measurements, never guesses.

Path ``torch``: torch's convolution (cuDNN) with the non-GEMM work in Triton (``_conv_torch``).
Path ``gemm``: the implicit-GEMM Triton kernels of ``_conv_gemm`` / ``_conv_gemm_backward`` (conv
with the prologue, epilogue and statistics fused in), where a module defines the kernel and its
``supports_<kernel>(*args)`` says yes.

``FUSED_RESNET_TRITON_CONV`` = ``torch`` | ``gemm`` | ``auto`` (default), read at import (or
:func:`set_mode`), forces a path or lets measurements decide. In ``auto`` on a GPU each new key (device name, kernel, dtypes, shapes,
layouts, conv parameters, flags, Triton version) is timed once both ways with
``triton.testing.do_bench`` (median) on the call's own arguments, and the winner is cached in
``$FUSED_RESNET_CACHE_DIR/choices.json`` (default ``~/.cache/fused_resnet``), shared across
processes. Nothing is measured during CUDA-graph capture (the torch path runs then, undecided),
off a GPU (the interpreter's timings mean nothing: the torch path runs), or in deterministic
mode unless the GEMM kernel's module sets ``DETERMINISTIC = True`` (no atomics).
:func:`decisions` lists the cache for ``python -m fused_resnet info``.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import triton

KERNELS = ("conv_stats", "conv_stats_backward", "conv_bias_act", "conv_bias_act_backward")
MODE_ENV = "FUSED_RESNET_TRITON_CONV"
CACHE_ENV = "FUSED_RESNET_CACHE_DIR"
_MODES = ("torch", "gemm", "auto")

_GEMM_MODULES = ("_conv_gemm", "_conv_gemm_backward")

_lock = threading.Lock()
_decisions: dict[str, dict] | None = None
_gemm_state: dict[str, tuple] = {}


def _parse(value: str) -> str:
    value = value.strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: expected one of {', '.join(_MODES)}")
    return value


def _from_env() -> tuple[str | None, str | None]:
    """``(mode, None)`` from ``FUSED_RESNET_TRITON_CONV``, or ``(None, error)`` for a bad value."""
    try:
        return _parse(os.environ.get(MODE_ENV, "auto")), None
    except ValueError as exc:
        return None, str(exc)


# Read once, at import, not per call (host cost: docs/design.md, decision 6). A bad value raises
# at the first Triton conv rather than at import, so that the rest of the package still loads.
_mode, _mode_error = _from_env()


def mode() -> str:
    """The conv path in force: ``torch``, ``gemm`` or ``auto``."""
    if _mode is None:
        raise ValueError(_mode_error)
    return _mode


def set_mode(value: str | None) -> None:
    """Forces the conv path (``torch`` | ``gemm`` | ``auto``) for the process, as
    ``FUSED_RESNET_TRITON_CONV`` does at import; ``None`` reads the variable again. A bad value
    raises ValueError and changes nothing."""
    global _mode, _mode_error
    _mode, _mode_error = _from_env() if value is None else (_parse(value), None)


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fused_resnet")
    return Path(root) / "choices.json"


def _gemm_modules() -> list:
    """The implicit-GEMM modules that import (they are optional); failures are kept for ``gemm_status``."""
    for name in _GEMM_MODULES:
        if name not in _gemm_state:
            try:
                _gemm_state[name] = (importlib.import_module(f"{__package__}.{name}"), None)
            except Exception as exc:  # noqa: BLE001 (absent or broken: the torch path covers everything)
                _gemm_state[name] = (None, f"{type(exc).__name__}: {exc}")
    return [_gemm_state[name][0] for name in _GEMM_MODULES if _gemm_state[name][0] is not None]


def gemm_status() -> str:
    """A line on the implicit-GEMM path: which kernels it has, and which modules failed to import."""
    _gemm_modules()
    have = [k for k in KERNELS if _gemm_kernel(k) is not None]
    failed = [f"{name}: {state[1]}" for name, state in _gemm_state.items() if state[1] is not None]
    return f"implicit-GEMM conv path: {', '.join(have) or 'no kernels'}" + (f" ({'; '.join(failed)})" if failed else "")


def _gemm_kernel(kernel: str):
    """``(fn, supports)`` of the implicit-GEMM ``kernel``, or None where no module has both."""
    for module in _gemm_modules():
        fn, supports = getattr(module, kernel, None), getattr(module, f"supports_{kernel}", None)
        if callable(fn) and callable(supports):
            return fn, supports
    return None


def _describe(arg) -> str:
    if isinstance(arg, torch.Tensor):
        cl = arg.dim() == 4 and arg.is_contiguous(memory_format=torch.channels_last) and not arg.is_contiguous()
        return f"{str(arg.dtype).removeprefix('torch.')}{list(arg.shape)}{'cl' if cl else ''}"
    if isinstance(arg, (list, tuple)):
        return "[" + ",".join(_describe(a) for a in arg) + "]"
    return repr(arg)


def key(kernel: str, args: tuple, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|triton {triton.__version__}|{kernel}|" + "|".join(_describe(a) for a in args)


def _load() -> dict[str, dict]:
    global _decisions
    if _decisions is None:
        try:
            _decisions = json.loads(cache_path().read_text())
        except (OSError, ValueError):
            _decisions = {}
    return _decisions


def _store(k: str, record: dict) -> None:
    with _lock:
        decisions = _load()
        decisions[k] = record
        path = cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # merge what other processes decided meanwhile
                merged = {**json.loads(path.read_text()), **decisions}
            except (OSError, ValueError):
                merged = dict(decisions)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as exc:  # a read-only home must not stop training: keep it in memory
            warnings.warn(f"fused_resnet: cannot write {path}: {exc}", stacklevel=3)


def decision_records() -> dict[str, dict]:
    """Every cached decision: key -> ``{"path", "torch_ms", "gemm_ms"}`` (or ``"error"``)."""
    return dict(_load())


def decisions() -> list[str]:
    """The cached decisions as lines ``key -> path (timings)``, for ``python -m fused_resnet info``."""
    lines = []
    for k, rec in sorted(_load().items()):
        timing = f"torch {rec['torch_ms']:.3f} ms" + (f", gemm {rec['gemm_ms']:.3f} ms" if "gemm_ms" in rec else "")
        lines.append(f"{k} -> {rec['path']} ({timing}{'; ' + rec['error'] if 'error' in rec else ''})")
    return lines


def _measure(torch_fn: Callable, gemm_fn: Callable, args: tuple) -> dict:
    from triton.testing import do_bench

    record = {"torch_ms": do_bench(lambda: torch_fn(*args), return_mode="median")}
    try:
        record["gemm_ms"] = do_bench(lambda: gemm_fn(*args), return_mode="median")
    except Exception as exc:  # noqa: BLE001 (a GEMM kernel that fails to build or run loses the race)
        warnings.warn(f"fused_resnet: implicit-GEMM conv failed, using torch's conv: {exc}", stacklevel=3)
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["path"] = "torch"
        return record
    record["path"] = "gemm" if record["gemm_ms"] < record["torch_ms"] else "torch"
    return record


def choose(kernel: str, args: tuple, torch_fn: Callable) -> Callable:
    """The function that runs ``kernel`` on ``args``: ``torch_fn`` or the implicit-GEMM kernel."""
    selected = mode()
    gemm = _gemm_kernel(kernel) if selected != "torch" else None
    if gemm is None or not gemm[1](*args):
        return torch_fn
    if selected == "gemm":
        return gemm[0]
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if device.type != "cuda":
        return torch_fn
    if torch.are_deterministic_algorithms_enabled() and not getattr(
        importlib.import_module(gemm[0].__module__), "DETERMINISTIC", False
    ):
        return torch_fn
    k = key(kernel, args, device)
    record = _load().get(k)
    if record is None:
        if torch.cuda.is_current_stream_capturing():
            return torch_fn
        record = _measure(torch_fn, gemm[0], args)
        _store(k, record)
    return gemm[0] if record["path"] == "gemm" else torch_fn
