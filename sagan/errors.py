"""The errors a user is meant to read, and the wrapper every command-line `main` runs under.

Every such error derives from `UserError` and carries its exit code: 2 when the input must change (a config key,
a path, a flag), 1 when the work ran and did not succeed (`JobFailed`). `command` turns one into the one line
`error: ...` on stderr and its code; Ctrl-C into 130; any other exception is a bug and keeps its traceback.
"""

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input or a state the user must fix; printed as one line, the process exits with `exit_code`."""

    exit_code = 2


class JobFailed(UserError):
    """The work ran and did not succeed (a stopped run, failed verification); the message says why."""

    exit_code = 1


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def command(main: Callable[..., int]) -> Callable[..., int]:
    """`main` that returns its exit status instead of raising a UserError or KeyboardInterrupt (130, as a shell
    reports SIGINT); the error's first line goes to stderr as `error: ...`."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            # Ray re-raises a task's error as a subclass of its class whose message is the remote traceback:
            # the line meant for the user is its cause's.
            cause = getattr(e, "cause", None)
            error = cause if isinstance(cause, UserError) else e
            print(f"error: {first_line(error)}", file=sys.stderr, flush=True)
            return error.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130

    return run


class UsageError(UserError):
    """A command-line flag or argument that cannot work; the message names it and the fix."""


class MetricsError(UserError, RuntimeError):
    """Evaluation cannot start (weights, data or statistics missing or mismatched); the message says the fix."""
