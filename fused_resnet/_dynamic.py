"""Fused subclasses of other libraries' classes (timm's blocks and ``BatchNormAct2d``), made on demand.

``fuse`` changes such a module's class in place to ``type(name, (mixin, original), {})``: the module
stays an instance of its own class (``isinstance``, its methods such as timm's ``zero_init_last``,
its attributes), and the mixin's ``forward`` falls back to the original one when the fused path
does not apply. fused_resnet imports neither timm nor torchvision, hence classes made at run time.
They are attributes of this module (PEP 562 ``__getattr__``) under a name that encodes the mixin and
the original class, so that a pickled fused model unpickles in a fresh process too.
"""

from __future__ import annotations

import importlib

_MIXINS: dict[str, type] = {}
_CLASSES: dict[tuple[type, type], type] = {}
_SEP = "__of__"


def register_mixin(mixin: type) -> type:
    """Decorator: ``mixin`` may be combined with other classes by :func:`subclass`."""
    _MIXINS[mixin.__name__] = mixin
    return mixin


def _encode(base: type) -> str:
    # Pickle splits a class's qualified name on dots: the base's module and name are joined by "_x_".
    return f"{base.__module__}.{base.__qualname__}".replace(".", "_x_")


def subclass(mixin: type, base: type) -> type:
    """The class ``mixin`` + ``base`` (one per pair), an attribute of this module."""
    key = (mixin, base)
    if key not in _CLASSES:
        name = f"{mixin.__name__}{_SEP}{_encode(base)}"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        _CLASSES[key] = cls
        globals()[name] = cls
    return _CLASSES[key]


def __getattr__(name: str) -> type:
    """Re-create a class made by :func:`subclass` in another process (unpickling)."""
    mixin_name, sep, encoded = name.partition(_SEP)
    if not sep:
        raise AttributeError(name)
    from . import modules  # noqa: F401  (registers the mixins)

    path = encoded.replace("_x_", ".")
    module_name, _, qualname = path.rpartition(".")
    while module_name:  # the split between module and (nested) class name is not encoded: try each
        try:
            base = importlib.import_module(module_name)
            for part in qualname.split("."):
                base = getattr(base, part)
            return subclass(_MIXINS[mixin_name], base)
        except (ImportError, AttributeError):
            module_name, _, head = module_name.rpartition(".")
            qualname = f"{head}.{qualname}"
    raise AttributeError(name)
