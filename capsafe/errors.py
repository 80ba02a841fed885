"""User-facing errors: each message says what is wrong and how to fix it; the CLI prints it and exits 2."""


class CapsafeError(Exception):
    """A mistake in the user's input or environment, reported without a traceback."""

    exit_code = 2


class SpecError(CapsafeError):
    """The experiment spec (YAML plus overrides) is invalid."""


class DataError(CapsafeError):
    """A data file named by the spec is missing or malformed."""


class ClusterError(CapsafeError):
    """The Ray cluster cannot be reached or cannot run the experiment."""
