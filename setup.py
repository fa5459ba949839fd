"""Builds the CPU kernels (llmserve/csrc/*.cpp) into the package as `llmserve._cpu_kernels` when
it is installed, so `make install` compiles them once and no start ever does. The rest of the
package's metadata is in pyproject.toml.

torch must already be installed: build without pip's build isolation
(`pip install --no-build-isolation ...`, as the Makefile does), which would otherwise fetch a
second torch (a CUDA one) to build against.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, get_cxx_compiler

ROOT = Path(__file__).resolve().parent


def _kernels() -> ModuleType:
    """llmserve/kernels.py by itself (the package's __init__ needs dependencies that may not be
    installed yet): the one place that lists the sources and flags, shared with its JIT fallback."""
    spec = importlib.util.spec_from_file_location("_llmserve_kernels", ROOT / "llmserve" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kernels = _kernels()


class BuildKernels(BuildExtension):
    """BuildExtension that writes, beside the module it builds, what the build assumed (the
    `_cpu_kernels.build.json` that kernels.py checks before loading it)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        # The recorded features must describe the objects in this build; never keep a module built
        # earlier, perhaps on another CPU, as up to date.
        self.force = True

    def build_extension(self, ext: CppExtension) -> None:
        flags = kernels.compile_flags()
        features = kernels.build_features(get_cxx_compiler(), flags)
        sources = kernels.sources_digest()  # before compiling: an edit during the build makes it stale
        # -march=native reads the same on every CPU, so ninja would keep objects compiled for
        # another one; naming the features on the command line makes it rebuild them. -g0 drops the
        # debug info Python's own CFLAGS ask for (tens of MB, and compile time). Appended:
        # BuildExtension has already added the flags it needs, TORCH_EXTENSION_NAME among them.
        key = hashlib.sha256(" ".join(features).encode()).hexdigest()[:16]
        ext.extra_compile_args += [f"-DLLMSERVE_BUILD_FEATURES={key}", "-g0"]
        super().build_extension(ext)
        info = self._info_path(self.get_ext_fullpath(ext.name))
        kernels.write_build_info(info, features=features, flags=flags, sources=sources)

    @staticmethod
    def _info_path(module_path: str) -> Path:
        return Path(module_path).with_name(kernels.BUILD_INFO.name)

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - no compiler or a failed build must not fail the install
            # The package still installs: at start kernels.py finds no build, tries one for the
            # CPU it runs on, and otherwise runs plain torch, saying so once.
            self.warn(f"llmserve: CPU kernels not built ({type(e).__name__}); starts will try a build "
                      "of their own and otherwise run plain torch")
            self._skipped = True

    def copy_extensions_to_source(self) -> None:
        """Editable installs (and --inplace) copy the module into llmserve/: its build info goes too."""
        super().copy_extensions_to_source()
        for built, in_source in self._info_mapping().items():
            self.copy_file(built, in_source, level=self.verbose)

    def _info_mapping(self) -> dict[str, str]:
        return {str(self._info_path(built)): str(self._info_path(in_source))
                for built, in_source in super().get_output_mapping().items() if built.endswith(".so")}

    def get_output_mapping(self) -> dict[str, str]:
        if getattr(self, "_skipped", False):
            return {}
        return {**super().get_output_mapping(), **self._info_mapping()}

    def get_outputs(self) -> list[str]:
        if getattr(self, "_skipped", False):
            return []
        outputs = super().get_outputs()  # with --inplace these already come from get_output_mapping
        infos = {str(self._info_path(o)) for o in outputs if o.endswith(".so")}
        return outputs + sorted(infos - set(outputs))


setup(
    ext_modules=[
        CppExtension(
            kernels.EXTENSION,
            sources=[str(p.relative_to(ROOT)) for p in kernels.kernel_sources()],
            depends=[str(p.relative_to(ROOT)) for p in kernels.kernel_headers()],
            extra_compile_args=kernels.compile_flags(),
            extra_link_args=kernels.LINK_FLAGS,
        )
    ],
    cmdclass={"build_ext": BuildKernels},
)
