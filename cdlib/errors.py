"""The errors that are the user's to fix, and how the command line reports them.

Every error cdlib raises for a mistake or a damaged input (a config value, a data
file, a run-store file, a full disk) is a :class:`UserError`; its message names what
is at fault (the file, the run, the value) and says what to do. ``python -m cdlib``
prints a ``UserError`` as one line on stderr and exits with code 2; any other
exception is a bug in cdlib and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path


class UserError(Exception):
    """Base class: the message is complete advice for the user, not a bug report."""


class ConfigError(UserError, ValueError):
    """A config, profile or objective argument is unknown or out of range."""


class StoreError(UserError, RuntimeError):
    """A run-store file is damaged, or the store cannot be written (permissions, full disk)."""


class DataError(UserError, RuntimeError):
    """A data set is missing or malformed; the message says where we looked and what to do."""


# Write failures that mean "no space" rather than a bug: full file system, quota, file-size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def read_json_file(path, what: str):
    """A JSON file named on a command line; a missing or malformed one is a ``ConfigError``."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}. Check the path.") from err
    except ValueError as err:
        raise ConfigError(f"{what} {path} is not valid JSON ({err}); fix or regenerate it.") from err


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (argparse prints the usage too)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def report_user_errors(command: str, main, argv) -> int:
    """Run ``main(argv)``; a UserError becomes one line on stderr and exit code 2."""
    try:
        result = main(argv)
    except UserError as err:
        print(f"python -m cdlib {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
