"""What every script shares: quiet library logs, and user errors as one line, not a traceback."""

import functools
import logging as std_logging
import sys

from absl import logging

from charlstm_jax.errors import UserError


class _OnlyOurs(std_logging.Filter):
    """Lets our INFO and WARNING lines through; libraries (orbax, jax) speak only at ERROR."""

    def filter(self, record):
        if record.levelno >= std_logging.ERROR:
            return True
        return "charlstm_jax" in record.pathname or "/scripts/" in record.pathname


def main_wrapper(main):
    """Wrap an absl `main`: INFO logging for our lines, `UserError` printed as `error: ...`."""

    @functools.wraps(main)
    def wrapped(argv):
        logging.set_verbosity(logging.INFO)
        logging.get_absl_handler().addFilter(_OnlyOurs())
        try:
            return main(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapped
