"""What a user can cause, as opposed to a bug.

Every error a user can fix (a missing file, a bad config field, a manifest that does not fit the
model) is a ``MedrayError``: the command line prints its message as one line and exits with its
``exit_code``; anything else is a bug and keeps its traceback. Messages name the file or field and
what to do, never patient data or secrets.
"""

from __future__ import annotations


class MedrayError(Exception):
    """A user's mistake: the command line shows the message alone and exits 2."""

    exit_code = 2


class CheckFailed(MedrayError):
    """A check that ran and found a problem in the data (e.g. leakage across splits): exit 1."""

    exit_code = 1


class DataError(MedrayError, ValueError):
    """Input data that cannot be used as given (a table without the needed columns, no usable rows)."""
