"""The project's error type for faults a user can cause (bad paths, bad data, mismatched stores)."""


class PkdError(Exception):
    """A user error: the CLI prints its message as one line and exits non-zero, without a traceback."""
