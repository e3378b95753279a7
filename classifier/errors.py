"""Errors a stage expects and reports as one line, without a traceback."""


class StageError(Exception):
    """A failure caused by input (params, data, files, store) that the user can fix."""


class ParamsError(StageError):
    """params.yaml is missing, malformed, or holds an unknown, mistyped or out-of-range key."""


class DataError(StageError):
    """Input data is missing, malformed or unusable for the configured pipeline."""


class TrainingDiverged(StageError):
    """The training loss became NaN or infinite."""
