"""Builds mpx's CPU decode kernel (mpx/kernels/decode_matmul.cc) at install time.

Everything else is in pyproject.toml. The kernel is optional: without a C++17
compiler, or on a CPU other than x86-64, the install goes on without it and
`mpx.kernels.status()` says so.
"""

import os
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildKernels(build_ext):
    """Adds the XLA FFI headers (shipped with jaxlib, a build requirement) to the include path."""

    def build_extensions(self):
        import jaxlib

        include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
        for ext in self.extensions:
            ext.include_dirs.append(include)
        super().build_extensions()


def kernels():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    return [Extension("mpx.kernels._decode_matmul", ["mpx/kernels/decode_matmul.cc"], language="c++",
                      extra_compile_args=["-std=c++17", "-O3", "-mavx2", "-mfma", "-mf16c"],
                      extra_link_args=["-pthread"], optional=True)]


setup(ext_modules=kernels(), cmdclass={"build_ext": BuildKernels})
