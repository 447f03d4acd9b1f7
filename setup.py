"""Builds the LSTM cell's CPU kernel, `charlstm_jax/kernels/lstm_cell.cc`, into the package.

The rest of the package is described in pyproject.toml. The kernel includes XLA's FFI headers,
which jaxlib ships (it is among the build requirements). Should it fail to compile (no C++20
compiler), the install goes on without it and the model runs its XLA path, as documented in
`charlstm_jax/cell_kernel.py`.
"""

import importlib.util
import os

from setuptools import Extension, setup

jaxlib_dir = importlib.util.find_spec("jaxlib").submodule_search_locations[0]

setup(
    ext_modules=[
        Extension(
            "charlstm_jax._lstm_cell",
            sources=["charlstm_jax/kernels/lstm_cell.cc"],
            depends=["charlstm_jax/kernels/lstm_step.inc"],
            include_dirs=[os.path.join(jaxlib_dir, "include")],
            extra_compile_args=["-std=c++20", "-O3", "-ffp-contract=fast", "-Wno-psabi"],
            extra_link_args=["-pthread"],
            language="c++",
            optional=True,
        )
    ]
)
