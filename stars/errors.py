"""User-facing errors: problems a user can fix. The CLI prints them and exits with code 2."""

from __future__ import annotations

__all__ = ["StarsError"]


class StarsError(Exception):
    """A problem with the user's input (config, files, data); the message says how to fix it."""
