"""Errors the user can fix; the CLI prints them as one message, without a traceback."""


class SetupError(Exception):
    """Configuration or environment that cannot work, with what to change."""
