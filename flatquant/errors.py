"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class FlatQuantError(Exception):
    """Base class for mistakes in user input (bad model, bits, data file, checkpoint, path...)."""


class ModelError(FlatQuantError):
    """Unknown model path/name or unsupported architecture."""


class DataError(FlatQuantError):
    """Missing or unusable data (file not found, text shorter than one window...)."""


class CheckpointError(FlatQuantError):
    """Corrupt or mismatched saved parameters."""


class NonFiniteError(FlatQuantError, FloatingPointError):
    """A NaN/inf where a number is needed (a damaged model, a diverged calibration, a perplexity)."""
