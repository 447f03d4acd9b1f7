"""What every script shares: the allocator setting, quiet library logs, user errors as one line."""

import functools
import logging as std_logging
import os
import sys
from pathlib import Path

import jax
from absl import logging

from charlstm_jax import allocator
from charlstm_jax.errors import UserError


class _OnlyOurs(std_logging.Filter):
    """Lets our INFO and WARNING lines through; libraries (orbax, jax) speak only at ERROR."""

    def filter(self, record):
        if record.levelno >= std_logging.ERROR:
            return True
        return "charlstm_jax" in record.pathname or "/scripts/" in record.pathname


def enable_compilation_cache() -> None:
    """Keep XLA's compiled programs on disk, so a resumed run or a second sample starts fast.

    The place is `$JAX_COMPILATION_CACHE_DIR` when set, else `~/.cache/charlstm_jax/xla`.
    """
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        directory = Path.home() / ".cache" / "charlstm_jax" / "xla"
        jax.config.update("jax_compilation_cache_dir", str(directory))
    # Every program: the validation pass and the params' init compile in under 0.5 s (the
    # default threshold), and were compiled again by every run.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def main_wrapper(main):
    """Wrap an absl `main`: freed memory reused (see `allocator`), INFO logging for our lines,
    `UserError` printed as `error: ...`, and the on-disk compilation cache."""

    @functools.wraps(main)
    def wrapped(argv):
        allocator.reuse_freed_memory()  # before jax starts its threads
        enable_compilation_cache()
        logging.set_verbosity(logging.INFO)
        logging.get_absl_handler().addFilter(_OnlyOurs())
        try:
            return main(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapped
