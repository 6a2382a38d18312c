"""Packaging for featinv: the Python package, ``kernels/`` as ``featinv.kernels``, and the
optional pybind11 extension ``featinv._C`` built with CMake (skipped with a warning, leaving the
pure-Python fallback, when CMake or a C++ compiler is missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake builds (see CMakeLists.txt)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[], optional=True)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        from setuptools.errors import CompileError

        cmake = shutil.which("cmake")
        if cmake is None:
            raise CompileError("cmake not found: featinv._C is skipped, the pure-Python fallback is used")
        try:
            import pybind11
        except ImportError as error:
            raise CompileError("pybind11 not installed: featinv._C is skipped") from error
        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        target = ext.name.rsplit(".", 1)[1]
        if target == "_sampler":  # the libtorch-based loops: torch's headers and libraries, no find_package
            try:
                import torch
                from torch.utils import cpp_extension
            except ImportError as error:
                raise CompileError("torch not importable: featinv._sampler is skipped") from error
            configure += [
                f"-DFEATINV_TORCH_INCLUDE={';'.join(cpp_extension.include_paths())}",
                f"-DFEATINV_TORCH_LIBDIR={cpp_extension.library_paths()[0]}",
                f"-DFEATINV_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                f"-DFEATINV_TORCH_VERSION={torch.__version__}",
            ]
        try:
            subprocess.run(configure, check=True)
            build = [cmake, "--build", str(build_dir), "--target", target, "--parallel", str(os.cpu_count() or 1)]
            subprocess.run(build, check=True)
        except (subprocess.CalledProcessError, OSError) as error:
            raise CompileError(f"building {ext.name} failed ({error}); the pure-Python fallback is used") from error


packages = find_packages(include=["featinv", "featinv.*"]) + ["featinv.kernels"]

# Metadata, dependencies, extras and the script are in pyproject.toml ([project]); this file adds
# what setuptools cannot read from there: the package layout and the CMake-built extensions.
setup(
    packages=packages,
    package_dir={"featinv.kernels": "kernels"},
    package_data={
        "featinv": [
            "pretrained/*.png",
            "pretrained/*.json",
            "pretrained/*.jsonl",
            "pretrained/*/*.json",
            "pretrained/*/*.jsonl",
            "pretrained/*/*.safetensors",
            "pretrained/*/*/*",
            "web/*.html",
            "web/*.js",
            "web/*.css",
        ]
    },
    ext_modules=[CMakeExtension("featinv._C"), CMakeExtension("featinv._sampler")],
    cmdclass={"build_ext": CMakeBuild},
)
