"""The one error type featinv raises for input a user can fix."""


class FeatInvError(ValueError):
    """Bad input or a bad file: the message names the argument, its value and what was expected.

    The CLI prints it as one line and exits with code 2.
    """
