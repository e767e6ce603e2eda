"""Errors that the CLI turns into a clear message and exit status 2 (never a traceback)."""


class LlamaLoraError(Exception):
    """A problem the user can fix; the message says what failed and what to do."""

    exit_code = 2


class ConfigError(LlamaLoraError):
    """Unknown key, wrong type or impossible value; the message starts with the dotted key."""


class DataError(LlamaLoraError):
    """Unreadable data file, unknown format, rows that cannot be used."""


class ModelError(LlamaLoraError):
    """A model that cannot be found, downloaded or loaded (hub, gated, offline, bad path)."""


class HubError(ModelError):
    """The Hugging Face hub refused or could not be reached (gated model, no token, offline)."""
