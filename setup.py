"""Build of the C atomics helper; everything else is in pyproject.toml."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmmmu._atomics",
            sources=["shmmmu/_atomics.c", "shmmmu/_locks.c"],
            depends=["shmmmu/_atomics.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
        ),
        Extension(
            "shmmmu._walker",
            sources=["shmmmu/_walker.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
        ),
        Extension(
            "shmmmu._sched",
            sources=["shmmmu/_sched.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
        ),
    ]
)
