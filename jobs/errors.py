"""Errors the `igfiqa` command line reports as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """An error a user can fix; printed without a traceback, exit status 2."""
