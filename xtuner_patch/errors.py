"""Errors in what a user gave us (arguments, files), reported without a traceback.

The ``xtuner-patch`` command line prints a :class:`UserError` as one line,
``error: <message>``, and exits with status 2; library callers get the exception.
"""


class UserError(Exception):
    """Bad input from the user: the message names the argument or file and what was expected."""


def check_positive(name: str, value) -> None:
    """Raise :class:`UserError` unless ``value`` > 0 (``name`` as the user spelled it)."""
    if value is None or value <= 0:
        raise UserError(f"{name} must be > 0, got {value}")


def check_non_negative(name: str, value) -> None:
    """Raise :class:`UserError` unless ``value`` >= 0."""
    if value is None or value < 0:
        raise UserError(f"{name} must be >= 0, got {value}")


def check_range(name: str, value, low, high=None) -> None:
    """Raise :class:`UserError` unless ``low <= value`` (and ``value <= high`` when given)."""
    if value is None or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise UserError(f"{name} must be {bound}, got {value}")
