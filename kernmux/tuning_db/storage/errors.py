"""The typed errors of the tuning database (light: no SQLAlchemy import).

Every storage failure is a :class:`TuningDBError` raised ``from`` the driver error; a
schema older or newer than the code is a :class:`SchemaMismatchError`; a record that
cannot be stored is an :class:`InvalidTrialError` (a ``ValueError``).
"""

from __future__ import annotations


class TuningDBError(RuntimeError):
    """A tuning-database operation failed; ``__cause__`` holds the driver error."""


class SchemaMismatchError(TuningDBError):
    """The database's schema revision is not the one this kernmux was written for."""

    def __init__(self, url: str, found: str | None, expected: str, direction: str):
        self.url, self.found, self.expected, self.direction = url, found, expected, direction
        shown = found or "(no revision stamp)"
        if direction == "newer":
            msg = (
                f"tuning database {url} is at schema revision {shown}, newer than this "
                f"kernmux knows (its newest is {expected}): it was written by a newer "
                f"kernmux; upgrade kernmux (pip install -U kernmux) or use another database"
            )
        else:
            msg = (
                f"tuning database {url} is at schema revision {shown}, older than this "
                f"kernmux ({expected}); run `kernmux db upgrade --db {url}`"
            )
        super().__init__(msg)


class InvalidTrialError(ValueError):
    """A trial record that cannot be stored (names the field and what was wrong)."""

