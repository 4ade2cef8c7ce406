"""User-facing errors: one sentence that names the thing and the fix.

The CLI prints `error: <message>` and exits non-zero for these; any other exception is
a bug in distill and keeps its traceback (shown with `--debug`).
"""


class DistillError(Exception):
    """An error the user can act on. The message is the whole story: what, where, what to do."""


class ConfigError(DistillError):
    """A config file, key, value or override is wrong."""


class DataError(DistillError):
    """A dataset or prompt source cannot be used."""


class ModelError(DistillError):
    """A teacher, student or checkpoint cannot be loaded."""


class TrainingStopped(DistillError):
    """A run stopped itself: a loss turned NaN/inf, or the method found training had failed (e.g. a discriminator
    that wins outright). The message names the step and the last good checkpoint."""
