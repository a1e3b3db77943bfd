"""Errors the command line reports as one line with exit status 2."""


class UsageError(Exception):
    """Bad arguments or unusable input: the message names the value and where it came from."""
