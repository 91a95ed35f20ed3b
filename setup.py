"""Build script: the Python package, plus the optional native extension (csrc/), in two libraries:
``fused_resnet/_C_ops.so`` (the ops' schemas, generated here from ``_library.py``'s SCHEMAS, their kernels,
backend choice and autograd; it links neither libpython nor libtorch_python, so ``torch.ops.load_library``
or a C++ program loads it) and the pybind module ``fused_resnet._C`` (the Python hooks; it links _C_ops).

What gets built (env variables, all optional):
  FUSED_RESNET_SKIP_EXT=1   pure-Python install, no extension (the ``native`` backend is then absent).
  CUDA_HOME / CUDA_PATH     the CUDA toolkit root (holding include/cuda_runtime.h and bin/nvcc). Unset: the
                            first toolkit among torch's guess, /usr/local/cuda and the toolkit of the nvcc on
                            PATH (through symlinks and `exec .../bin/nvcc` wrapper scripts).
  FORCE_CUDA=1              the CUDA kernels or an error: a CUDA torch and a toolkit are required. By default
                            they are built when torch is a CUDA build and a toolkit is found, GPU or not, and
                            otherwise the CPU kernels only, with a warning; the extension then says why
                            (``_C.CUDA_SKIP_REASON``, shown by ``python -m fused_resnet info``).
  FUSED_RESNET_SKIP_CUDA=1  CPU kernels only, even with a CUDA torch and toolkit.
  TORCH_CUDA_ARCH_LIST      CUDA targets, e.g. "8.0;9.0" (default when no GPU is visible: "8.0;9.0+PTX").
  MAX_JOBS                  parallel compile jobs (default: bounded by cores and by memory, ~1.5 GB each).
  FUSED_RESNET_DEBUG=1      -O0 -g host code.
  FUSED_RESNET_LOCAL_VERSION=1  a local version label naming the torch and CUDA the extension is built against
                            (``0.1.0+torch2.14.1cu130``, ``0.1.0+torch2.13.0cpu``): scripts/build_cuda_wheels.sh.

With the extension, the distribution requires exactly the torch it is built against (``torch==2.14.1``, which
any local build of it such as ``2.14.1+cu130`` satisfies): pip installs that torch with it; `pip check` flags another.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) so the build uses the torch that is
already installed: the extension is tied to that torch version (see the README).
"""

from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _default_max_jobs() -> int:
    """One job per core, but no more than memory allows (a job peaks at ~1.5 GB)."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()}
        mem_gb = info.get("MemAvailable", info.get("MemTotal", 0)) / 2**20
        return max(1, min(cores, int(mem_gb / 1.5)))
    except (OSError, ValueError):
        return max(1, min(cores, 4))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern), recursive=True))


def _is_toolkit(root: str | None) -> bool:
    """A CUDA toolkit root: the runtime headers and nvcc (a bare nvcc or a runtime without headers won't build)."""
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and os.access(
        os.path.join(root, "bin", "nvcc"), os.X_OK
    )


def _nvcc_toolkit() -> str | None:
    """The toolkit of the nvcc on PATH, following symlinks and one-line wrapper scripts
    (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), which torch takes for the toolkit itself."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    roots = [os.path.dirname(os.path.dirname(nvcc))]
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            roots += [m.decode() for m in re.findall(rb"(/[^\s'\"]+)/bin/nvcc\b", head)]
    except OSError:
        pass
    return next((root for root in roots if _is_toolkit(root)), None)


def _find_cuda_toolkit(torch_guess: str | None) -> tuple[str | None, str]:
    """The CUDA toolkit root to build with, or None and why none was taken.

    An explicit CUDA_HOME / CUDA_PATH is never overridden by a guess: if it is not a toolkit, no CUDA
    kernels are built (the warning says so) rather than kernels from some other toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if _is_toolkit(root):
                return root, ""
            return None, f"{var}={root} is not a CUDA toolkit (no include/cuda_runtime.h or bin/nvcc there)"
    for root in (torch_guess, "/usr/local/cuda", _nvcc_toolkit()):
        if _is_toolkit(root):
            return os.path.realpath(root), ""
    return None, (
        f"no CUDA toolkit with headers was found (CUDA_HOME unset; torch's guess {torch_guess}, /usr/local/cuda "
        f"and the nvcc on PATH ({shutil.which('nvcc')}) hold no include/cuda_runtime.h and bin/nvcc)"
    )


def _cuda_plan(torch, cpp_extension) -> tuple[bool, str]:
    """Whether to build the CUDA kernels and, if not, why (compiled into the extension as CUDA_SKIP_REASON).
    With a toolkit found, CUDA_HOME and cpp_extension.CUDA_HOME (read when the build runs) point at it."""
    version = torch.__version__
    if _flag("FUSED_RESNET_SKIP_CUDA"):
        return False, "FUSED_RESNET_SKIP_CUDA=1 was set at build time"
    if torch.version.cuda is None:
        if _flag("FORCE_CUDA"):
            raise RuntimeError(
                f"FORCE_CUDA=1 but torch {version} is a CPU-only build (torch.version.cuda is None): install a "
                "CUDA torch or drop FORCE_CUDA to build the CPU extension only."
            )
        return False, f"torch {version} is a CPU-only build"
    root, why = _find_cuda_toolkit(cpp_extension.CUDA_HOME)
    if root is None:
        reason = (f"torch {version} is a CUDA build but {why}; set CUDA_HOME to the toolkit root (the directory "
                  "holding include/cuda_runtime.h and bin/nvcc) and rebuild")
        if _flag("FORCE_CUDA"):
            raise RuntimeError(f"FORCE_CUDA=1 but no CUDA kernels can be built: {reason}")
        return False, reason
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root
    print(f"fused_resnet: building the CUDA kernels with the toolkit at {root} (torch {version}, CUDA "
          f"{torch.version.cuda})", file=sys.stderr)
    return True, ""


def _warn(message: str) -> None:
    """A build-time warning that stands out in the compiler output (pip shows it with -v)."""
    bar = "!" * 100
    print(f"\n{bar}\nWARNING (fused_resnet): {message}\n{bar}\n", file=sys.stderr, flush=True)


def _c_string(text: str) -> str:
    """``text`` as a C string literal (octal escapes for anything but printable ASCII, quotes, backslashes)."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and chr(b) not in '"\\?' else f"\\{b:03o}"
                         for b in text.encode()) + '"'


def _schemas() -> tuple[str, dict[str, str]]:
    """NAMESPACE and SCHEMAS of fused_resnet/_library.py, read without importing the package: its top-level
    assignments of constant expressions (strings, f-strings of earlier ones, the dict) evaluated in order."""
    path = os.path.join(ROOT, "fused_resnet", "_library.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    allowed = (ast.Constant, ast.JoinedStr, ast.FormattedValue, ast.Name, ast.Load, ast.BinOp, ast.Add, ast.Dict)
    names: dict[str, object] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if node.__class__ in (ast.Assign, ast.AnnAssign) and node.value is not None and len(targets) == 1 \
                and isinstance(targets[0], ast.Name) and all(isinstance(n, allowed) for n in ast.walk(node.value)):
            try:
                names[targets[0].id] = eval(compile(ast.Expression(node.value), path, "eval"), {"__builtins__": {}},
                                            dict(names))
            except NameError:  # refers to something computed at import: not a schema's part
                pass
    return names["NAMESPACE"], names["SCHEMAS"]


def _schemas_header() -> str:
    """``fr_schemas.h``: FR_SCHEMAS, the schemas csrc/ops.cpp defines in its TORCH_LIBRARY block."""
    namespace, schemas = _schemas()
    if namespace != "fused_resnet":  # TORCH_LIBRARY takes the namespace as a token (csrc/ops.cpp)
        raise RuntimeError(f"csrc/ops.cpp defines the namespace fused_resnet, _library.py says {namespace}")
    lines = [f"    {_c_string(name + schema)}," for name, schema in schemas.items()]
    return ("// Generated by setup.py from fused_resnet/_library.py's SCHEMAS: edit them there.\n"
            "static const char* const fr_schemas[] = {\n" + "\n".join(lines) + "\n};\n#define FR_SCHEMAS fr_schemas\n")


def _write_if_changed(path: str, text: str) -> None:
    """Rewritten only on change: ninja's depfiles then rebuild only what includes it."""
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if old != text:
        with open(path, "w") as f:
            f.write(text)


def _build_ext_class(cpp_extension, skip_reason: str):
    """torch's BuildExtension (ninja), plus generated headers in the build's temp dir: ``fr_build_info.h``
    carries text no -D flag carries safely through ninja and the shell (why no CUDA kernels were built),
    ``fr_schemas.h`` the ops' schemas. ``_C_ops`` gets a plain name (``_C_ops.so``: the same for every
    Python, for C++ loaders) and ``_C`` links it, found next to it at run time ($ORIGIN)."""
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        def get_ext_filename(self, fullname):
            parts = fullname.split(".")  # the full name, or its last part (depending on the setuptools)
            if parts[-1] == OPS.split(".")[-1]:
                return os.path.join(*parts[:-1], parts[-1] + ".so")
            return super().get_ext_filename(fullname)

        def build_extensions(self):
            gen = os.path.join(os.path.abspath(self.build_temp), "fr_generated")
            os.makedirs(gen, exist_ok=True)
            _write_if_changed(os.path.join(gen, "fr_build_info.h"),
                              f"// Generated by setup.py.\n#define FR_CUDA_SKIP_REASON {_c_string(skip_reason)}\n")
            _write_if_changed(os.path.join(gen, "fr_schemas.h"), _schemas_header())
            ops_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(OPS)))
            for ext in self.extensions:
                ext.include_dirs.append(gen)
                if ext.name != OPS:
                    ext.library_dirs.append(ops_dir)
            super().build_extensions()

    return BuildExtension


OPS = "fused_resnet._C_ops"


def _build_base(torch) -> str:
    """build/ per torch (``build/torch2.14.1-cu130``): objects, and setuptools' "up to date" check of the
    built library, are then never those of another torch, whose ABI the extension would not match."""
    return os.path.join("build", "torch" + torch.__version__.replace("+", "-"))


def _extensions():
    if _flag("FUSED_RESNET_SKIP_EXT"):
        return [], {}, {}
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    with_cuda, skip_reason = _cuda_plan(torch, cpp_extension)
    _BUILT["cuda"] = with_cuda
    if not with_cuda and torch.version.cuda is not None:
        _warn(f"building the CPU kernels only: {skip_reason}.")
    version = torch.__version__.split("+")[0]
    opt = ["-O0", "-g"] if _flag("FUSED_RESNET_DEBUG") else ["-O3", "-g0"]
    # at::parallel_for is OpenMP code inlined from the headers: without -fopenmp it would not compile.
    cxx = opt + ["-fopenmp", f"-DFR_TORCH_VERSION={version}", "-DFR_HAVE_BUILD_INFO"]
    sources = _sources("*.cpp") + _sources("cpu/*.cpp")
    # Every csrc file is a `depends`: headers and (in a CPU build) the CUDA sources then go into the
    # sdist, so that it builds with or without CUDA, and a change to a header rebuilds the extension;
    # _library.py holds the schemas that fr_schemas.h is generated from.
    depends = _sources("**/*.h") + _sources("cuda/*.cpp") + _sources("cuda/*.cu") + ["fused_resnet/_library.py"]
    # --no-undefined: a reference to Python (libpython, libtorch_python) fails the link, not the load.
    link = ["-fopenmp", "-Wl,--no-undefined", "-Wl,-soname,_C_ops.so"]
    kwargs = {"name": OPS, "extra_link_args": link, "depends": depends}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DFR_WITH_CUDA"]
        ops = cpp_extension.CUDAExtension(
            sources=sources + _sources("cuda/*.cpp") + _sources("cuda/*.cu"),
            extra_compile_args={"cxx": cxx + ["-DFR_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    else:
        ops = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    ops.libraries = [lib for lib in ops.libraries if lib != "torch_python"]
    # The pybind module: Python's side of the hooks; -l:_C_ops.so links the library by its file name.
    module = cpp_extension.CppExtension(
        name="fused_resnet._C", sources=_sources("python/*.cpp"), extra_compile_args={"cxx": opt},
        extra_link_args=["-l:_C_ops.so", "-Wl,-rpath,$ORIGIN"], depends=_sources("*.h"),
    )
    # Defaults only: setup.cfg, DIST_EXTRA_CONFIG and the command line (--build-temp, ...) override them.
    options = {"build": {"build_base": _build_base(torch)}}
    return [ops, module], {"build_ext": _build_ext_class(cpp_extension, skip_reason)}, options


_BUILT: dict[str, bool] = {}  # whether the extension gets the CUDA kernels (set by _extensions)


def _metadata() -> dict:
    """The version (``fused_resnet.__version__``, with FUSED_RESNET_LOCAL_VERSION=1 a local label naming the
    torch and the CUDA kernels built, or cpu) and the torch requirement: exactly the torch the extension is built
    against, any torch >= 2.4 without the extension."""
    with open(os.path.join(ROOT, "fused_resnet", "__init__.py")) as f:
        version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.MULTILINE).group(1)
    if _flag("FUSED_RESNET_SKIP_EXT"):
        return {"version": version, "install_requires": ["torch>=2.4"]}
    import torch

    built = torch.__version__.split("+")[0]
    if _flag("FUSED_RESNET_LOCAL_VERSION"):
        cuda = "cu" + torch.version.cuda.replace(".", "") if _BUILT.get("cuda") else "cpu"
        version += f"+torch{built}{cuda}"
    return {"version": version, "install_requires": [f"torch=={built}"]}


ext_modules, cmdclass, options = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options, **_metadata())
