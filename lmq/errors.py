"""Errors a user can act on.

Library code raises an `LmqError` subclass whose message says what was wrong, the value seen, and
the fix. The CLI prints `error: <message>` and exits with `exit_code`. Any other exception is a bug
and keeps its traceback.
"""


class LmqError(Exception):
    """A problem with the user's input or environment, explained in the message."""

    exit_code = 1


class InputError(LmqError):
    """A path, file, option or value given by the user is missing, malformed or unsupported."""


class CheckpointError(LmqError):
    """A checkpoint is missing files, is corrupt, or has a format this lmq cannot read."""


class UnsupportedError(LmqError):
    """A model architecture, option combination or device that lmq does not support (yet)."""


class ShapeError(LmqError):
    """A tensor shape, dtype or layout does not fit what a kernel or quantizer needs."""
