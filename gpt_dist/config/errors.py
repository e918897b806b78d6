"""The bottom of the config package: every config module raises this, and imports nothing else
of the project, so the package has no import cycle."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem; the message is one line naming the key and the fix."""
