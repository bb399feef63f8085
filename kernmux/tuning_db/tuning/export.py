"""Moving tuning data between machines: versioned JSON export, validated import, merge.

Format (version 1)::

    {"format": "kernmux-tuning", "version": 1, "exported_at": "...", "schema_revision": "...",
     "rows": [{"op": ..., "kernel": ..., ..., "created_at": "2026-05-20T12:00:00+00:00",
               "host": ..., "content_hash": "<sha256>"}, ...]}

Each row holds every :class:`TrialRecord` field (row ids are local and not exported).
Import validates each row on its own: bad rows are reported by index with the reason
and the good ones are still stored. ``content_hash`` is recomputed; a row whose stored
hash disagrees was edited and is rejected. Rows already present (same hash) are
skipped, so importing or merging twice adds nothing the second time.
"""

from __future__ import annotations

import datetime as dt
import json
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from kernmux.tuning_db.storage.errors import InvalidTrialError, TuningDBError
from kernmux.tuning_db.storage.models import Trial
from kernmux.tuning_db.storage.paths import normalize_url
from kernmux.tuning_db.storage.records import RECORD_FIELDS, TrialRecord, normalize_record, shown, stored_values
from kernmux.tuning_db.storage.store import TuningStore

FORMAT = "kernmux-tuning"
VERSION = 1
_CHUNK = 500


class ExportFormatError(ValueError):
    """The document is not a kernmux tuning export this code can read."""


@dataclass
class ImportReport:
    """What an import or merge did. ``bad``: (row index, reason) for rejected rows."""

    total: int = 0
    added: int = 0
    duplicates: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    # Set when the database failed mid-import: what happened, and how many valid rows
    # were not stored (``added`` rows were committed before it).
    error: str | None = None
    not_stored: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad and self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "added": self.added,
            "duplicates": self.duplicates,
            "bad": [{"index": i, "reason": r} for i, r in self.bad],
            "error": self.error,
            "not_stored": self.not_stored,
        }

    def summary(self) -> str:
        text = f"{self.total} rows: {self.added} added, {self.duplicates} already present, {len(self.bad)} bad"
        if self.error is not None:
            text += f", {self.not_stored} not stored"
        text += "".join(f"\n  row {i}: {r}" for i, r in self.bad)
        if self.error is not None:
            text += f"\nimport stopped {self.error}"
        return text


# --------------------------------------------------------------------------- export


def row_to_dict(row: Any) -> dict[str, Any]:
    """One stored row in export form (JSON-ready)."""
    out = {f: getattr(row, f) for f in RECORD_FIELDS}
    out["created_at"] = row.created_at.isoformat()
    out["content_hash"] = row.content_hash
    return out


def export_doc(store: TuningStore, *, op: str | None = None) -> dict[str, Any]:
    """The export document of every row (of ``op`` when given), oldest first."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "schema_revision": store.revision(),
        "rows": [row_to_dict(r) for r in store.rows(op=op)],
    }


def write_export(store: TuningStore, out: str | pathlib.Path | IO[str], *, op: str | None = None) -> int:
    """Write the export to a path or text stream; returns the number of rows."""
    doc = export_doc(store, op=op)
    text = json.dumps(doc, indent=1, sort_keys=False, allow_nan=False)
    if isinstance(out, (str, pathlib.Path)):
        pathlib.Path(out).write_text(text + "\n")
    else:
        out.write(text + "\n")
    return len(doc["rows"])


def load_export(path: str | pathlib.Path) -> dict[str, Any]:
    """Read and check the envelope of an export file (rows are checked on import).

    Only a regular file is read (a FIFO would hang, a device never ends); a file that
    is not UTF-8 JSON, nests too deep or holds an integer Python refuses to parse
    raises :class:`ExportFormatError`."""
    file = pathlib.Path(path)
    if file.exists() and not file.is_file():
        raise ExportFormatError(f"{path}: not a regular file")
    try:
        doc = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ExportFormatError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ExportFormatError(f"{path}: not JSON: {e}") from e
    except RecursionError:
        raise ExportFormatError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal over Python's digit limit
        raise ExportFormatError(f"{path}: unreadable JSON: {str(e)[:200]}") from None
    check_envelope(doc, str(path))
    return doc


def check_envelope(doc: Any, where: str = "document") -> None:
    if not isinstance(doc, Mapping):
        raise ExportFormatError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise ExportFormatError(f"{where}: expected format {FORMAT!r}, got {shown(doc.get('format'))}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ExportFormatError(f"{where}: expected an integer version, got {shown(version)}")
    if version > VERSION:
        raise ExportFormatError(
            f"{where}: export format version {version} is newer than this kernmux reads "
            f"(up to {VERSION}); upgrade kernmux"
        )
    if version < 1:
        raise ExportFormatError(f"{where}: unknown export format version {version}")
    if not isinstance(doc.get("rows"), list):
        raise ExportFormatError(f"{where}: expected a list under 'rows'")


# --------------------------------------------------------------------------- import


_OPTIONAL = {"p50_us", "p20_us", "p80_us", "reps", "error", "study", "trial_number", "host"}


def record_from_dict(data: Any) -> tuple[TrialRecord, str | None]:
    """A normalized record from one exported row, and the hash the row claimed.

    Raises InvalidTrialError naming the field and the problem."""
    if not isinstance(data, Mapping):
        raise InvalidTrialError(f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(RECORD_FIELDS) - {"content_hash"})
    if unknown:
        raise InvalidTrialError(f"unknown field(s) {', '.join(shown(u, 40) if not u.isidentifier() else u for u in unknown[:10])}")
    missing = [f for f in RECORD_FIELDS if f not in data and f not in _OPTIONAL]
    if missing:
        raise InvalidTrialError(f"missing field(s) {', '.join(missing)}")
    fields = {f: data.get(f) for f in RECORD_FIELDS}
    created = fields["created_at"]
    if not isinstance(created, str):
        raise InvalidTrialError(f"created_at: expected an ISO 8601 string, got {shown(created)}")
    try:
        fields["created_at"] = dt.datetime.fromisoformat(created)
    except ValueError:
        raise InvalidTrialError(f"created_at: not an ISO 8601 time: {shown(created)}") from None
    claimed = data.get("content_hash")
    if claimed is not None and not isinstance(claimed, str):
        raise InvalidTrialError(f"content_hash: expected a string, got {shown(claimed)}")
    return normalize_record(TrialRecord(**fields), stamp=False), claimed


def import_rows(store: TuningStore, rows: Sequence[Any]) -> ImportReport:
    """Validate every row, then insert the valid ones (rows already present are skipped).

    Row-level isolation: a chunk is inserted in one statement; when the database rejects
    it (a value the validation let through), each row of the chunk is retried alone in
    a savepoint, so only the rows the database refuses are reported as bad. A failure of
    the database itself (disk full, I/O error, connection lost) stops the import: the
    chunks committed before it stay, and the report says how many rows were stored and
    how many were not (``report.error``); importing the file again adds only the rest."""
    report = ImportReport(total=len(rows))
    pending: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()
    for index, data in enumerate(rows):
        try:
            record, claimed = record_from_dict(data)
            values = stored_values(record)
        except InvalidTrialError as e:
            report.bad.append((index, str(e)))
            continue
        if claimed is not None and claimed != values["content_hash"]:
            report.bad.append((index, "content_hash does not match the row's content (edited after export?)"))
            continue
        if values["content_hash"] in seen:
            report.duplicates += 1
            continue
        seen.add(values["content_hash"])
        pending.append((index, values))
    for start in range(0, len(pending), _CHUNK):
        chunk = pending[start : start + _CHUNK]
        try:
            outcome = store._retry(lambda chunk=chunk: insert_isolated(store, chunk))
        except TuningDBError as e:
            report.not_stored = len(pending) - start
            report.error = (
                f"at row {chunk[0][0]}: {e}; {report.added} row(s) were stored before it, "
                f"{report.not_stored} valid row(s) were not (importing the file again adds only those)"
            )
            break
        report.added += outcome.added
        report.duplicates += outcome.present
        report.bad.extend(outcome.rejected)
    report.bad.sort()
    return report


@dataclass
class ChunkOutcome:
    """What :func:`insert_isolated` did with one chunk."""

    added: int = 0
    present: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)


def _row_level(error: BaseException) -> bool:
    """True when the database refused a row's values (the row is bad), False when the
    database itself failed (disk full, I/O error, lost connection: stop importing)."""
    if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.InternalError,
                          sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return False
    return isinstance(error, (sa_exc.SQLAlchemyError, ValueError, OverflowError, TypeError, UnicodeError))


def _reason(error: BaseException) -> str:
    cause = getattr(error, "orig", None) or error
    text = " ".join(str(cause).split())
    return f"refused by the database: {type(cause).__name__}: {text[:300]}"


def insert_isolated(store: TuningStore, chunk: Sequence[tuple[int, dict[str, Any]]]) -> ChunkOutcome:
    """Insert ``chunk`` ((row index, column values) pairs) in one transaction, skipping
    rows whose hash is stored already; rows the database refuses are returned with the
    reason, the others are committed. Database failures raise :class:`TuningDBError`."""
    outcome = ChunkOutcome()
    with store.session_scope(write=True) as session:
        hashes = [v["content_hash"] for _, v in chunk]
        present = set(session.scalars(sa.select(Trial.content_hash).where(Trial.content_hash.in_(hashes))))
        new = [(i, v) for i, v in chunk if v["content_hash"] not in present]
        outcome.present = len(chunk) - len(new)
        if not new:
            return outcome
        stmt = _insert_ignoring_duplicates(store)
        try:
            with session.begin_nested():
                session.connection().execute(stmt, [v for _, v in new])
            outcome.added = len(new)
            return outcome
        except Exception as e:
            if not _row_level(e):
                raise
        for index, values in new:  # the batch was refused: find the rows that are bad
            try:
                with session.begin_nested():
                    result = session.connection().execute(stmt, values)
            except Exception as e:
                if not _row_level(e):
                    raise
                outcome.rejected.append((index, _reason(e)))
                continue
            if result.rowcount == 0:  # stored by a concurrent import meanwhile
                outcome.present += 1
            else:
                outcome.added += 1
    return outcome


def _insert_ignoring_duplicates(store: TuningStore) -> Any:
    """INSERT ... ON CONFLICT (content_hash) DO NOTHING where the backend has it: a
    concurrent merge of the same rows is not an error."""
    if store.backend == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif store.backend == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # other backends: the existence check before it is the only guard
        return sa.insert(Trial)
    return insert(Trial).on_conflict_do_nothing(index_elements=["content_hash"])


def import_file(store: TuningStore, path: str | pathlib.Path) -> ImportReport:
    """Import an export file (envelope errors raise ExportFormatError)."""
    return import_rows(store, load_export(path)["rows"])


def _is_sqlite_file(path: pathlib.Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def merge(store: TuningStore, source: str | pathlib.Path) -> ImportReport:
    """Merge rows into ``store`` from another database (a URL or a SQLite file) or an
    export file. Idempotent: merging the same source again adds nothing."""
    text = str(source)
    if "://" not in text:
        if not _is_sqlite_file(pathlib.Path(text)):
            return import_file(store, text)
        text = normalize_url(text)
    if normalize_url(text) == store.url:
        raise TuningDBError(f"cannot merge {store.display_url} into itself")
    with TuningStore(text, create=False, read_only=True) as other:
        rows = [row_to_dict(r) for r in other.rows()]
    return import_rows(store, rows)
