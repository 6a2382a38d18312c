"""The one error type featinv raises for input a user can fix."""


class FeatInvError(ValueError):
    """Bad input or a bad file: the message names the argument, its value and what was expected.

    The CLI prints it as one line and exits with code 2.
    """


def require_positive_int(name: str, value: object) -> int:
    """``value`` if it is an integer >= 1 (a bool is not); otherwise a FeatInvError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FeatInvError(f"{name} must be a positive integer, got {value!r}")
    return value
