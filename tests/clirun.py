"""`pilotfish` run in the test's own process, for the many tests of settings that must be refused
before anything starts (exit 2, the setting and value named): a subprocess costs ~0.3 s of
interpreter start and imports each, this a few milliseconds. The command line, the environment
and stderr are the process's own while it runs; a command that would serve instead of refusing
fails at once (trio.run raises) rather than serving inside the test. What only a real process
shows (the exit status of the interpreter, signals) stays with subprocess tests."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from unittest import mock

from pilotfish.agent import cli


class WouldServe(AssertionError):
    """The command accepted its settings and went on to serve."""


def _refuse_to_serve(*args: object, **kwargs: object) -> None:
    raise WouldServe("the command accepted its settings and went on to serve")


def run_cli(argv: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`pilotfish ARGV` with `env` added to the environment, as a finished process: its exit
    status (argparse's SystemExit included) and what it wrote to stderr."""
    saved_env = dict(os.environ)
    root = logging.getLogger("pilotfish")
    saved_logging = (root.handlers[:], root.level, root.propagate)
    stderr, stdout = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env or {})
        with mock.patch.object(sys, "stderr", stderr), mock.patch.object(sys, "stdout", stdout), \
                mock.patch("trio.run", _refuse_to_serve):
            try:
                code = cli.main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        root.handlers[:], root.level, root.propagate = saved_logging
    return subprocess.CompletedProcess(["pilotfish", *argv], code, stdout.getvalue(), stderr.getvalue())
