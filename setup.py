"""Build script: maps the source folders onto the `recscore` package and compiles the Cython bindings."""
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NUMPY_API = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
# Cython translates in worker processes; where they start by spawn (not fork) each would run this
# script again, so only Linux translates in parallel (the C compiles run in threads everywhere).
CYTHON_PROCESSES = (os.cpu_count() or 1) if sys.platform == "linux" else 0


def c_kernels(name):
    """A CPU kernel extension: the C in bindings/<name>.h behind its Cython wrapper bindings/<name>.pyx.

    AVX-512 functions carry their own target attribute and are picked at run time: no -march
    flag, so the extension loads on any x86-64 CPU.
    """
    return Extension(f"recscore.bindings.{name}", [f"bindings/{name}.pyx"], depends=[f"bindings/{name}.h"],
                     include_dirs=[np.get_include(), "bindings"], extra_compile_args=["-O3", "-fopenmp"],
                     extra_link_args=["-fopenmp"], define_macros=NUMPY_API)


extensions = [
    Extension("recscore.bindings._checks", ["bindings/_checks.pyx"], include_dirs=[np.get_include()],
              extra_compile_args=["-O3"], define_macros=NUMPY_API),
    c_kernels("_qmatmul_vnni"),
    c_kernels("_embedding_bag"),
    c_kernels("_topk_scan"),
]



class ParallelBuildExt(build_ext):
    """Compiles the extensions side by side (one compiler a core) unless --parallel says otherwise."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count()


setup(
    cmdclass={"build_ext": ParallelBuildExt},
    packages=[
        "recscore",
        "recscore.bindings",
        "recscore.kernels",
        "recscore.kernels.quantize_rows",
        "recscore.kernels.embedding_bag",
        "recscore.kernels.topk",
        "recscore.kernels.qmatmul",
    ],
    package_dir={
        "recscore": "engine",
        "recscore.bindings": "bindings",
        "recscore.kernels": "kernels",
        "recscore.kernels.quantize_rows": "kernels/quantize_rows",
        "recscore.kernels.embedding_bag": "kernels/embedding_bag",
        "recscore.kernels.topk": "kernels/topk",
        "recscore.kernels.qmatmul": "kernels/qmatmul",
    },
    ext_modules=cythonize(extensions, nthreads=CYTHON_PROCESSES, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False}),
)
