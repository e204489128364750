"""The project's own error: a problem the user can fix, reported as one line with the fix (exit code 2)."""
from __future__ import annotations


class UserError(Exception):
    """Raised for anything the user can fix (config, inputs, files, disk); the message names the fix."""


class ConfigError(UserError, ValueError):
    """A config value or an input file is wrong (a ValueError too, so callers that catch ValueError still work)."""


class OutputError(UserError, OSError):
    """An output file could not be written; nothing is left behind."""


class TrainingDiverged(UserError, FloatingPointError):
    """A non-finite loss, gradient or weight; training stops and the last good checkpoint stays."""
