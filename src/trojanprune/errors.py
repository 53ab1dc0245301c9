"""Errors a user can act on.

Anything raised as :class:`TrojanPruneError` is printed by the CLI as one line (no traceback)
and gives exit code 2. The message says what is wrong and what to do about it.
"""


class TrojanPruneError(Exception):
    """A problem with the user's input or environment, with a message saying how to fix it."""


class DataError(TrojanPruneError):
    """A dataset is missing, malformed or does not fit the model."""


class CheckpointError(TrojanPruneError):
    """A checkpoint cannot be loaded safely or does not fit the architecture."""


class ConfigError(TrojanPruneError):
    """An unknown name or an invalid option value."""
