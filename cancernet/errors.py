"""Errors a user can fix; the command line prints their one-line message and exits non-zero."""


class UserError(Exception):
    """Bad input, config or environment; the message names the file or key and what is wrong."""
