"""How the CPU kernels are found: the installed build, its CPU-feature check, the JIT fallback's lock."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from llmserve import kernels

# Runs the loader in a fresh process and prints where its module came from ("None" for plain
# torch). With "stale", it first leaves what a start killed mid-build leaves: torch's `lock` file in
# the JIT build directory, which torch alone would wait on forever. (The directory is computed in
# the same process: it is keyed by csrc/, which may change between processes while kernels are
# being worked on.)
_LOADER = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from llmserve import kernels
build_dir = kernels.jit_build_dir()
if sys.argv[1:] == ["stale"]:
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "lock").touch()
k = kernels.cpu_kernels()
print("KERNELS", None if k is None else k.__name__, None if k is None else k.__file__, build_dir)
"""


def _run_loader(env: dict[str, str], timeout_s: float, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LOADER, *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def _loaded(proc: subprocess.CompletedProcess) -> list[str]:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("KERNELS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return lines[-1].split()[1:]  # name, file, JIT build dir


@pytest.fixture
def jit_env(request, monkeypatch) -> dict[str, str]:
    """The JIT fallback forced, its cache under pytest's cache dir: keyed by CPU and sources like
    the real one, so it is built once per machine and checkout state, not on every run."""
    cache = request.config.cache.mkdir("llmserve-kernels")
    monkeypatch.setenv("LLMSERVE_KERNELS_CACHE", str(cache))
    monkeypatch.setenv("LLMSERVE_DEV_KERNELS", "1")
    return dict(os.environ)


def test_stale_torch_build_lock_does_not_hang_start(jit_env):
    if kernels.cxx_compiler() is None:
        pytest.skip("no C++ compiler to build the CPU kernels")
    proc = _run_loader(jit_env, 900, "stale")  # a cold build on a busy 2-core machine takes minutes
    name, _, build_dir = _loaded(proc)
    assert name == Path(build_dir).name, proc.stderr[-3000:]
    assert "left by an interrupted kernel build" in proc.stderr
    assert not (Path(build_dir) / "lock").exists()


def test_a_held_build_lock_is_waited_on_until_a_deadline_then_plain_torch(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(kernels, "jit_build_dir", lambda: tmp_path / "build")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: f"/usr/bin/{name}")  # the wait comes first
    monkeypatch.setenv("LLMSERVE_KERNELS_LOCK_TIMEOUT", "0.5")
    (tmp_path / "build").mkdir()
    with open(tmp_path / "build" / "llmserve.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process building (flock conflicts per open file)
        with caplog.at_level("WARNING", logger=kernels.__name__):
            assert kernels._jit_kernels("a test") is None
    assert "Waiting for another process" in caplog.text
    assert "Gave up waiting" in caplog.text
    with kernels.build_lock(tmp_path / "build" / "llmserve.lock", timeout_s=0.5):
        pass  # free again once its holder lets go


def test_installed_kernels_import_without_a_compiler(tmp_path):
    import torch

    if not kernels.BUILD_INFO.exists():
        pytest.skip("the kernels are not installed here (make install builds them)")
    problem = kernels.build_problem(json.loads(kernels.BUILD_INFO.read_text()), kernels.cpu_features(),
                                    kernels.sources_digest(), torch.__version__)
    if problem:
        pytest.skip(f"the installed build does not fit this checkout or CPU: {problem} (make install)")
    no_tools = tmp_path / "bin"  # PATH with no gcc, c++, cc, clang or ninja on it
    no_tools.mkdir()
    env = {**os.environ, "PATH": str(no_tools), "LLMSERVE_KERNELS_CACHE": str(tmp_path / "jit")}
    env.pop("LLMSERVE_DEV_KERNELS", None)
    env.pop("CXX", None)
    name, path, _ = _loaded(_run_loader(env, 300))
    assert name == "llmserve._cpu_kernels"
    assert Path(path).parent == kernels.BUILD_INFO.parent
    assert not (tmp_path / "jit").exists()  # nothing was built


def test_a_build_for_features_this_cpu_lacks_is_refused():
    info = {"features": ["avx2", "avx512_bf16", "avx512f", "fma"], "sources": "s", "torch": "t"}
    zen3 = frozenset({"sse2", "avx", "avx2", "fma", "f16c"})
    problem = kernels.build_problem(info, zen3, "s", "t")
    assert problem is not None and "avx512_bf16, avx512f" in problem
    assert kernels.build_problem(info, zen3 | {"avx512f", "avx512_bf16"}, "s", "t") is None


def test_a_build_of_other_sources_or_torch_is_refused():
    info = {"features": [], "sources": "old", "torch": "2.13.0"}
    assert "csrc" in kernels.build_problem(info, frozenset(), "new", "2.13.0")
    assert "torch" in kernels.build_problem({**info, "sources": "new"}, frozenset(), "new", "2.14.0")


def test_isa_macros_map_to_the_building_cpus_flags():
    macros = ["__AVX2__", "__FMA__", "__SSE3__", "__AVX512BF16__", "__OPTIMIZE__", "__znver4__", "__AVX512F__"]
    cpu = {"avx2", "fma", "pni", "avx512_bf16", "sse2"}  # no avx512f: -march=native would not enable it
    assert kernels.isa_features(macros, cpu) == ["avx2", "avx512_bf16", "fma", "pni"]


def test_cpu_features_reads_x86_and_arm_cpuinfo(tmp_path):
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert kernels.cpu_features(x86) == {"fpu", "sse2", "avx2", "fma"}
    assert kernels.cpu_features(arm) == {"fp", "asimd", "sve"}
    assert kernels.cpu_features(tmp_path / "missing") == frozenset()


def test_the_package_installs_without_a_compiler(tmp_path):
    """No compiler at install time: the wheel still builds, without the kernels (a start then tries
    a build of its own and otherwise runs plain torch)."""
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".venv", ".git", "bench-results", "build", "*.so",
                                                             "__pycache__", "*.egg-info", ".pytest_cache"))
    env = dict(os.environ, CXX="/bin/false", CC="/bin/false")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", str(src),
                           "-w", str(tmp_path / "dist")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("llmserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "llmserve/kernels.py" in names
    assert not any("_cpu_kernels" in n for n in names)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the x86 instruction-set levels")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_sources_with_isa_functions_compile_for_cpus_without_those_isas(march):
    """A source whose functions take their instruction sets by target attribute (AVX2, AVX-512
    VNNI, AMX) must compile for a CPU that has none of them: -march=native on an AMX machine hides a
    call to an AMX intrinsic from a function not built for AMX, which fails the build everywhere
    else (and then every start runs plain torch). -O0: always_inline is honoured at every level."""
    from torch.utils.cpp_extension import include_paths

    compiler = kernels.cxx_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    sources = [p for p in kernels.kernel_sources() if "__attribute__((target" in p.read_text()]
    assert sources, "no source declares per-function instruction sets any more: drop this test"
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    for source in sources:
        done = subprocess.run([compiler, "-std=c++20", "-O0", "-fopenmp", f"-march={march}", *includes,
                               "-DTORCH_EXTENSION_NAME=isa_probe", "-c", str(source), "-o", os.devnull],
                              capture_output=True, text=True, timeout=600)
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        assert done.returncode == 0, f"{source.name} for -march={march}:\n" + "\n".join(errors[:10])
