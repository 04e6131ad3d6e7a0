"""Errors a user can act on. Each message names the file, key or dataset and says what to do."""


class TuneGraphError(Exception):
    """Base class: anything raised on purpose for bad input or a failed run."""


class ConfigError(TuneGraphError):
    """A config file or value is wrong (names file and key)."""


class DatasetError(TuneGraphError):
    """A dataset cannot be used as configured (names the dataset id)."""


class TrainingError(TuneGraphError):
    """Training cannot go on (NaN loss, unwritable output, bad resume path)."""
