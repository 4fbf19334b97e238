"""Errors that map to the command line's exit codes.

The CLI turns these into one clear message and an exit code; anything else is an unexpected
failure (exit 1, traceback only with ``--debug``).
"""

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USER_ERROR = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


class DedlocError(Exception):
    """Base class: the message is meant for the user, as is."""

    exit_code = EXIT_UNEXPECTED


class UserInputError(DedlocError):
    """The user's input is wrong: flags, config, files, a malformed address (exit code 2)."""

    exit_code = EXIT_USER_ERROR


class IncompatibleSwarmError(UserInputError):
    """This peer cannot take part in the run it reached (protocol, config or tokenizer mismatch)."""


class SwarmUnreachableError(DedlocError):
    """The swarm or the coordinator cannot be reached (exit code 3)."""

    exit_code = EXIT_UNREACHABLE
