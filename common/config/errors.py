"""The one exception every configuration check raises."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change."""
