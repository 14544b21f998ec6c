"""Errors the command line turns into one line on stderr and exit status 2."""


class InputError(Exception):
    """Bad input or arguments: the message names the file or flag and the fix."""


class Interrupted(Exception):
    """The run was asked to stop (SIGTERM/SIGINT) and has saved its state."""
