"""Declares the compiled fast path; all metadata lives in pyproject.toml."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# KDNS_DEBUG=1 compiles bounds assertions into the packet path (uvloop's UVLOOP_DEBUG idea).
debug = os.environ.get("KDNS_DEBUG") == "1"

ext = Extension(
    "kdns.packet._fastpath",
    sources=["kdns/packet/_fastpath.pyx"],
    extra_compile_args=["-O3", "-fno-strict-aliasing"] + ([] if debug else ["-DNDEBUG"]),
    define_macros=[("_GNU_SOURCE", "1"), ("KDNS_DEBUG", "1" if debug else "0")],
)

setup(
    ext_modules=cythonize(
        [ext],
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
