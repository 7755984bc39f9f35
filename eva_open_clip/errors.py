"""Errors the command line reports in one line, without a traceback, and their exit statuses."""
from __future__ import annotations


class ToolError(RuntimeError):
    """A failure while working (a file that cannot be written, a model that cannot be loaded): exit status 1."""

    exit_code = 1


class UsageError(ToolError):
    """A mistake in the command's arguments or inputs, found before any work: exit status 2."""

    exit_code = 2
