"""Build step of the fake accelerator runtime; every other setting is in pyproject.toml.

``prism_sim/libsimxpu.cpython-*.so`` is a plain shared library (no ``PyInit``): the
simulator loads it with ctypes (``prism_sim.runtime.library_path()``). It is built here so
that ``pip install -e .`` (what ``make test`` runs) leaves it next to the package.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "prism_sim.libsimxpu",
            sources=["prism_sim/runtime/simxpu.c"],
            depends=["prism_sim/runtime/simxpu.h"],
            # Probe-friendly entry points: every exported function that is not a trivial
            # leaf starts with `endbr64; push %rbp` (an instruction uprobes emulate), not
            # with a shrink-wrapped test or a tail-call jump.
            extra_compile_args=["-O2", "-fcf-protection=full", "-fno-omit-frame-pointer",
                                "-fno-shrink-wrap", "-fno-optimize-sibling-calls",
                                "-pthread"],
            extra_link_args=["-pthread"],
            libraries=["m"],
        ),
    ],
)
