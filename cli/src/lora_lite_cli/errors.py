"""The one error type of the CLI: shown to the user as one line, with an exit code."""
from __future__ import annotations


class CLIError(Exception):
    """An error shown to the user as one line, with exit code ``code``."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def one_line(message) -> str:
    """A message squeezed onto one line (library errors sometimes span several)."""
    return " ".join(str(message).split())
