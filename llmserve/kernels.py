"""llmserve's CPU kernels (csrc/*.cpp): built at install time, loaded only where they fit.

setup.py compiles csrc/*.cpp into the extension `llmserve._cpu_kernels` when the package is
installed, for the installing CPU (`-march=native` unless LLMSERVE_PORTABLE_KERNELS=1), and writes
beside it `_cpu_kernels.build.json`: the instruction-set features the compiler was allowed to use
(its ISA macros, named as /proc/cpuinfo names them), a digest of csrc/ and the torch version.

`cpu_kernels()` imports that build only if this CPU has every one of those features (a .venv can
be kept while the machine under it changes), csrc/ still has the digest (an editable checkout
whose kernels were edited since) and torch is the same. Otherwise, or with LLMSERVE_DEV_KERNELS=1,
it builds the kernels with torch's JIT builder into a cache directory named by a digest of this
CPU's features, the sources, the flags and torch, under a lock of its own that a killed build
cannot leave held and that is waited on only until a deadline. If that fails too (no compiler) it
returns None, with one warning, and callers use plain torch.

This module imports only the standard library at the top: setup.py loads it by path, before the
package's dependencies are installed, so the source list and flags live in one place.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
EXTENSION = "llmserve._cpu_kernels"  # the installed build; setup.py names it so too
BUILD_INFO = Path(__file__).with_name("_cpu_kernels.build.json")
LINK_FLAGS = ["-fopenmp"]
_JIT_NAME = "llmserve_cpu_kernels"
_LOCK_TIMEOUT_S = 600.0  # a build takes a minute or two; waiting longer means something is wrong
_LOCK_NOTE_EVERY_S = 30.0

# gcc and clang name a few ISA macros differently from the kernel's /proc/cpuinfo flags; any other
# `__NAME__` macro is looked up as `name`.
_MACRO_TO_CPU_FLAG = {
    "__SSE3__": "pni",
    "__LZCNT__": "abm",
    "__BMI__": "bmi1",
    "__PCLMUL__": "pclmulqdq",
    "__SHA__": "sha_ni",
    "__RDRND__": "rdrand",
    "__PRFCHW__": "3dnowprefetch",
    "__AVXVNNI__": "avx_vnni",
    "__AVX512VNNI__": "avx512_vnni",
    "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16",
    "__AVX512VBMI2__": "avx512_vbmi2",
    "__AVX512BITALG__": "avx512_bitalg",
    "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq",
    "__AVX512VP2INTERSECT__": "avx512_vp2intersect",
}
_MACRO_DEFINE = re.compile(r"#define (__[A-Za-z0-9_]+__) ")

_module: ModuleType | bool | None = None


# --- what is built, and with which flags: one place for setup.py and the JIT fallback ---

def kernel_sources() -> list[Path]:
    """Every kernel source; bindings.cpp declares what Python sees."""
    return sorted(CSRC.glob("*.cpp"))


def kernel_headers() -> list[Path]:
    return sorted(CSRC.glob("*.h"))


def compile_flags() -> list[str]:
    """vec_math.h and the GEMMs pick their AVX2/FMA/F16C code by compiler macros, so a portable
    build runs the scalar paths; `-march=native` is the default and the feature check guards it."""
    flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    portable = os.environ.get("LLMSERVE_PORTABLE_KERNELS", "0") not in ("", "0")
    return flags if portable else flags + ["-march=native"]


def sources_digest(paths: Iterable[Path] | None = None) -> str:
    """Names and bytes of csrc/*.cpp and *.h (or of `paths`): tells a build from the sources it was
    made of."""
    digest = hashlib.sha256()
    for path in kernel_sources() + kernel_headers() if paths is None else paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# --- instruction-set features: what a build assumed, what this CPU has ---

def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This CPU's feature flags as Linux reports them (x86 `flags`, Arm `Features`); empty where
    they cannot be read, which makes any build that assumed a feature refuse to load."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def compiler_macros(compiler: str, flags: Iterable[str]) -> set[str]:
    """The `__NAME__` macros the compiler defines under these flags (`-march=native` defines one
    per instruction-set extension it may emit)."""
    out = subprocess.run([compiler, *flags, "-dM", "-E", "-x", "c++", "-"], input="", text=True,
                         capture_output=True, check=True).stdout
    return set(_MACRO_DEFINE.findall(out))


def isa_features(macros: Iterable[str], cpu: Iterable[str]) -> list[str]:
    """The CPU flags behind the compiler's ISA macros, as far as `cpu` (the building CPU) reports
    them: that drops the macros that name no feature (__OPTIMIZE__, __znver4__, ...), while every
    extension -march=native enables is one this CPU has."""
    cpu = set(cpu)
    names = (_MACRO_TO_CPU_FLAG.get(m, m.strip("_").lower()) for m in macros)
    return sorted({n for n in names if n in cpu})


def build_features(compiler: str, flags: list[str]) -> list[str]:
    """What a build with these flags assumes of the CPU; setup.py calls it on the building CPU."""
    return isa_features(compiler_macros(compiler, flags), cpu_features())


def write_build_info(path: Path, features: list[str], flags: list[str], sources: str) -> None:
    """Written by setup.py beside the extension it built; checked by build_problem before loading."""
    import torch

    info = {"features": features, "sources": sources, "torch": torch.__version__, "flags": flags}
    path.write_text(json.dumps(info, indent=1) + "\n")


def build_problem(info: dict, cpu: frozenset[str], sources: str, torch_version: str) -> str | None:
    """Why a build described by `info` must not be loaded here, or None if it may be: a feature
    this CPU lacks would crash on an illegal instruction, other sources would be a stale build,
    another torch would not link."""
    missing = sorted(set(info.get("features", [])) - cpu)
    if missing:
        return f"built for CPU features this CPU lacks: {', '.join(missing)}"
    if info.get("sources") != sources:
        return "csrc/ changed since it was built"
    if info.get("torch") != torch_version:
        return f"built against torch {info.get('torch')}, this is torch {torch_version}"
    return None


# --- loading ---

def _installed_kernels() -> tuple[ModuleType | None, str]:
    """The installed extension if it fits this machine, else None and why not."""
    import torch  # the extension links against torch's libraries: load them first

    if importlib.util.find_spec(EXTENSION) is None or not BUILD_INFO.exists():
        return None, "none is installed; make install builds it"
    try:
        info = json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return None, f"{BUILD_INFO.name} cannot be read"
    problem = build_problem(info, cpu_features(), sources_digest(), torch.__version__)
    if problem:
        return None, problem
    try:
        return importlib.import_module(EXTENSION), ""
    except ImportError as e:
        return None, f"it does not import: {e.__class__.__name__}"


def jit_cache_root() -> Path:
    root = os.environ.get("LLMSERVE_KERNELS_CACHE")
    if root:
        return Path(root)
    import platformdirs

    return Path(platformdirs.user_cache_dir("llmserve")) / "kernels"


def jit_build_dir() -> Path:
    """One directory per (CPU features, sources, flags, torch, Python): a .venv or cache that moves
    to another CPU builds anew instead of loading code for the old one."""
    import torch

    key = hashlib.sha256()
    for part in (" ".join(sorted(cpu_features())), sources_digest(), " ".join(compile_flags()),
                 torch.__version__, f"{sys.version_info[0]}.{sys.version_info[1]}"):
        key.update(part.encode() + b"\0")
    return jit_cache_root() / f"{_JIT_NAME}_{key.hexdigest()[:16]}"


@contextlib.contextmanager
def build_lock(path: Path, timeout_s: float) -> Iterator[None]:
    """An exclusive flock on `path`, waited on until `timeout_s` (then TimeoutError). The kernel
    drops a flock when its holder dies, so a killed build cannot leave it held, unlike torch's
    `lock` file, which a later start waits on forever."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        next_note = start
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= timeout_s:
                    raise TimeoutError(f"{path} held for {waited:.0f}s") from None
                if time.monotonic() >= next_note:
                    logger.warning("Waiting for another process to finish building the CPU kernels "
                                   "(lock %s, %.0fs of at most %.0fs)", path, waited, timeout_s)
                    next_note += _LOCK_NOTE_EVERY_S
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the flock


def _clear_stale_torch_lock(build_dir: Path) -> None:
    """Every build in `build_dir` holds our lock, so a torch `lock` file found while we hold it was
    left by a build that was killed, and torch would wait on it forever."""
    stale = build_dir / "lock"
    if stale.exists():
        logger.warning("Removing %s, left by an interrupted kernel build", stale)
        stale.unlink(missing_ok=True)


def _lock_timeout_s() -> float:
    return float(os.environ.get("LLMSERVE_KERNELS_LOCK_TIMEOUT", _LOCK_TIMEOUT_S))


def jit_build(build_dir: Path, sources: list[Path], flags: list[str]) -> ModuleType:
    """torch's JIT build of `sources` into `build_dir`, as a module named after it: one build at a
    time under our lock, a torch lock left by a killed build cleared first."""
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    with build_lock(build_dir / "llmserve.lock", _lock_timeout_s()):
        _clear_stale_torch_lock(build_dir)
        return load(name=build_dir.name, sources=[str(s) for s in sources], extra_cflags=flags,
                    extra_ldflags=LINK_FLAGS, build_directory=str(build_dir), verbose=False)


def cxx_compiler() -> str | None:
    """The C++ compiler torch builds extensions with (CXX, else c++), or None where it is not on
    this machine."""
    from torch.utils.cpp_extension import get_cxx_compiler

    compiler = get_cxx_compiler()
    return compiler if shutil.which(compiler) else None


def _jit_kernels(why: str, notice_level: int = logging.WARNING) -> ModuleType | None:
    """Build (or reuse) the kernels for this CPU with torch's JIT builder; None if that fails.
    `why` says why the installed build is not used, for the one line this logs either way."""
    if cxx_compiler() is None:
        from torch.utils.cpp_extension import get_cxx_compiler

        logger.warning("CPU kernels unavailable: the installed build is not used (%s) and there is no "
                       "C++ compiler (%s) to build them; running plain torch", why, get_cxx_compiler())
        return None
    build_dir = jit_build_dir()
    logger.log(notice_level, "Not using the installed CPU kernels (%s); using a build for this CPU in %s "
               "(compiled there on first use, once per CPU and source version)", why, build_dir)
    try:
        return jit_build(build_dir, kernel_sources(), compile_flags())
    except TimeoutError:
        logger.warning("Gave up waiting for the CPU kernel build lock after %.0fs "
                       "(LLMSERVE_KERNELS_LOCK_TIMEOUT); running plain torch", _lock_timeout_s())
    except Exception as e:  # no ninja, a compile error: plain torch still works
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        logger.warning("CPU kernels unavailable: building them for this CPU failed (%s: %s); "
                       "running plain torch", e.__class__.__name__, first_line)
    return None


def _load() -> ModuleType | None:
    if os.environ.get("LLMSERVE_DEV_KERNELS") == "1":
        return _jit_kernels("LLMSERVE_DEV_KERNELS=1", logging.INFO)
    module, why_not = _installed_kernels()
    return module if module is not None else _jit_kernels(why_not)


def cpu_kernels() -> ModuleType | None:
    """The compiled kernels module, or None where no build fits and none can be made (callers
    then use plain torch). Decided once per process."""
    global _module
    if _module is None:
        _module = _load() or False
    return _module or None
