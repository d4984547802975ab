"""Declares the compiled fast path; all metadata lives in pyproject.toml."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# KDNS_DEBUG=1 compiles bounds assertions into the packet path (uvloop's UVLOOP_DEBUG idea).
debug = os.environ.get("KDNS_DEBUG") == "1"

flags = dict(
    extra_compile_args=["-O3", "-fno-strict-aliasing"] + ([] if debug else ["-DNDEBUG"]),
    define_macros=[("_GNU_SOURCE", "1"), ("KDNS_DEBUG", "1" if debug else "0")],
)
# Two extensions, not one: the worker's packet path must not carry the supervisor's compiler
# (which holds the GIL, allocates and raises); they share only kdns/zone/layout.pxd.
exts = [
    Extension("kdns.packet._fastpath", sources=["kdns/packet/_fastpath.pyx"], **flags),
    Extension("kdns.zone._compile", sources=["kdns/zone/_compile.pyx"], **flags),
]

setup(
    ext_modules=cythonize(
        exts,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
