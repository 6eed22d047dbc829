"""User-facing errors: each carries one line that names what went wrong."""


class DiffusionMICError(ValueError):
    """A problem the user can fix (bad input, bad option, missing model); printed as one line."""


class Cancelled(RuntimeError):
    """Raised when the user cancels a running job."""


class DiffusionMICWarning(UserWarning):
    """Something the user should know about an input or a run that still goes ahead (one line)."""
