"""The project's own errors: one base class, so callers (and the launch scripts) can tell a
known, explained failure from a bug.

Every error class of the library derives from `XcoderError` in addition to the built-in class
it has always been (StoreError is still a ValueError, TrainingError still a RuntimeError), so
existing `except ValueError` clauses keep catching them. A launch script reports an
XcoderError as the one line `error: <message>` (see `launch_util.run_main`); anything else is
a bug and shows its traceback.
"""

from __future__ import annotations


class XcoderError(Exception):
    """A known failure whose message says what went wrong and what to do about it."""


class ConfigError(XcoderError, ValueError):
    """A config value (or a file a config value names) cannot be used."""


class MissingInputError(XcoderError, FileNotFoundError):
    """An input the run needs does not exist yet (a data file, the zoo, a prompt file)."""


class UsageError(XcoderError, ValueError):
    """A library function was called with arguments it cannot work with (an empty latent
    set, a model slot or latent id the crosscoder does not have)."""
