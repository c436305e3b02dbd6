"""Build script: maps the source folders onto the `recscore` package and compiles the Cython bindings."""
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "recscore.bindings._checks",
        ["bindings/_checks.pyx"],
        include_dirs=[np.get_include()],
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
    # AVX-512 VNNI functions carry their own target attribute and are picked at run time:
    # no -march flag, so the extension loads on any x86-64 CPU.
    Extension(
        "recscore.bindings._qmatmul_vnni",
        ["bindings/_qmatmul_vnni.pyx"],
        depends=["bindings/_qmatmul_vnni.h"],
        include_dirs=[np.get_include(), "bindings"],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
    Extension(
        "recscore.bindings._embedding_bag",
        ["bindings/_embedding_bag.pyx"],
        depends=["bindings/_embedding_bag.h"],
        include_dirs=[np.get_include(), "bindings"],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
    Extension(
        "recscore.bindings._topk_scan",
        ["bindings/_topk_scan.pyx"],
        depends=["bindings/_topk_scan.h"],
        include_dirs=[np.get_include(), "bindings"],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
]

setup(
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
    ext_modules=cythonize(extensions, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False}),
)
