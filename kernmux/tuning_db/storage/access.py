"""How a tuning database is opened: read-write, read-only or immutable, and why.

A database shipped read-only (a container image, a read-only mount) is the normal way to
deploy a tuned one, so a store that only reads must never need write access:

* the caller asks for read-only (reading commands and the runtime always do), or the
  SQLite URL does (``?mode=ro``, ``?immutable=1``);
* for a SQLite file, :func:`unwritable_reason` says why it cannot be written whatever
  was asked (read-only file system, file or directory not writable); a store that must
  write refuses at once with that reason instead of failing later in a journal switch;
* a read-only SQLite file opens with ``mode=ro``, or ``immutable=1`` where even that
  would write (a WAL database whose directory cannot hold its ``-shm`` file).

Light: no SQLAlchemy import.
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
import urllib.parse
from dataclasses import dataclass

from kernmux.tuning_db.storage.errors import TuningDBError
from kernmux.tuning_db.storage.paths import sqlite_options, sqlite_path

# How long probing a file waits for a writer's lock (as long as the engines wait).
_READ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Access:
    """read_only: this store never writes. reason: why the database cannot be written
    ("" when it can, as far as the file system tells). immutable: SQLite's
    ``immutable=1`` (no locks; changes by other processes are not seen)."""

    read_only: bool
    reason: str = ""
    immutable: bool = False

    @property
    def mode(self) -> str:
        return "immutable" if self.immutable else ("read-only" if self.read_only else "read-write")

    def note(self) -> str:
        """One line for ``db show`` and explain."""
        if not self.read_only:
            return "read-write"
        if not self.reason:
            return "writable (opened read-only: this command only reads)"
        text = f"read-only: {self.reason}"
        if self.immutable:
            text += "; opened with immutable=1 (changes by other processes are not seen)"
        return text


def unwritable_reason(path: pathlib.Path) -> str:
    """Why the SQLite database at ``path`` cannot be written ("" when it can): SQLite
    writes the file and creates its journal (or WAL and shared-memory) files beside it."""
    directory = path.parent
    try:
        if os.statvfs(directory if directory.exists() else directory.parent).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
    except OSError:
        pass
    if path.exists() and not os.access(path, os.W_OK):
        return "the file is not writable"
    if directory.exists() and not os.access(directory, os.W_OK | os.X_OK):
        return f"its directory {directory} is not writable"
    return ""


def sqlite_uri(path: pathlib.Path, **options: str) -> str:
    """A SQLite ``file:`` URI for ``path`` (characters such as ``?`` and ``#`` escaped)."""
    query = urllib.parse.urlencode(options)
    return f"file:{urllib.parse.quote(str(path))}" + (f"?{query}" if query else "")


def sqlite_read_mode(path: pathlib.Path) -> tuple[str, str]:
    """How to read the SQLite file at ``path`` without writing anything: ("ro", "") when
    ``mode=ro`` works, else ("immutable", why). Raises ``sqlite3.Error`` when the file
    cannot be read at all."""
    def probe(**options: str) -> None:
        conn = sqlite3.connect(sqlite_uri(path, **options), uri=True, timeout=_READ_TIMEOUT_S)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()

    try:
        probe(mode="ro")
        return "ro", ""
    except sqlite3.OperationalError as e:
        text = str(e).lower()
        if "readonly" not in text and "read-only" not in text and "unable to open" not in text:
            raise
        why = f"mode=ro needs to write SQLite's shared-memory file ({e})"
    probe(mode="ro", immutable="1")
    return "immutable", why


def decide(url: str, *, create: bool, read_only: bool) -> Access:
    """How to open ``url``; creates a new SQLite file's directory when ``create`` and
    writing. Raises :class:`TuningDBError` for a missing file that is not to be created,
    a file that cannot be written by a store that must write, or one that cannot be read."""
    options = sqlite_options(url)
    asked = options.get("mode") == "ro" or options.get("immutable") == "1"
    read_only = read_only or asked
    reason = "the URL opens it read-only" if asked else ""
    immutable = options.get("immutable") == "1"
    path = sqlite_path(url)
    if path is None:
        return Access(read_only, reason, immutable)
    reason = reason or unwritable_reason(path)
    if not path.exists():
        if not create or read_only:
            raise TuningDBError(f"no tuning database at {path} (create one with `kernmux db upgrade --db {url}`)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TuningDBError(f"cannot create tuning database {path}: {e.strerror or e}") from e
    if not read_only:
        if reason:
            raise TuningDBError(
                f"tuning database {path} is read-only ({reason}): this command writes to it; reading "
                f"commands (db show/export/report, explain, rules derive) and kernmux.ops open it "
                f"read-only, or pass --db with a writable database"
            )
        return Access(False)
    if not immutable:
        try:
            mode, why = sqlite_read_mode(path)
        except sqlite3.Error as e:
            raise TuningDBError(f"cannot read tuning database {path}: {type(e).__name__}: {e}") from e
        immutable = mode == "immutable"
        reason = reason or (why if immutable else "")
    return Access(True, reason, immutable)
