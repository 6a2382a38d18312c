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


MAX_SEED = (1 << 63) - 1


def require_seed(name: str, value: object, count: int = 1) -> int:
    """``value`` if it is an integer seed such that ``value + count - 1`` (the last of ``count``
    consecutive seeds, e.g. ``seed + i`` for image i) fits a generator: [0, 2^63 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED - max(0, count - 1):
        high = "2^63 - 1" if count <= 1 else f"2^63 - {count} (image i uses {name} + i)"
        raise FeatInvError(f"{name} must be an integer in [0, {high}], got {value!r}")
    return value
