"""Trial records and their validation: what one row of the tuning database holds.

:class:`TrialRecord` is one measured or failed trial; :func:`normalize_record` checks
every field (naming the field and what was wrong) and returns it in stored form;
:func:`content_hash` identifies a row's content so merges are idempotent. Light: no
SQLAlchemy import, so a trial worker can build records without the database stack.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kernmux.dispatch.platform import Platform
from kernmux.tuning_db.storage.errors import InvalidTrialError

STATUSES = ("ok", "numerics_failed", "crashed", "timeout", "error", "unsupported", "verified")
# Statuses that mean "this kernel/config gave a wrong answer or did not finish".
FAILURE_STATUSES = ("numerics_failed", "crashed", "timeout", "error")

# Libraries whose version is recorded but never invalidates a row: kernmux's own
# version changes with every release without changing a measured library kernel.
IGNORED_LIBS = frozenset({"kernmux"})
# torch and triton matter for every kernel (torch reference, torch.compile, Triton).
BASE_LIBS = ("torch", "triton")


@dataclass
class TrialRecord:
    """One measured (or failed) trial; nothing is overwritten.

    config/features/bucket: JSON objects (scalars inside). metrics: error measures
    against the reference (``Comparison.metrics``); non-finite floats are stored as
    the strings "nan", "inf", "-inf". p50/p20/p80 in microseconds (required when
    status is "ok"). fingerprint: ``Platform.fingerprint()``; platform:
    ``Platform.as_dict()`` without libs; libs: versions of the libraries the result
    depends on (see :func:`relevant_libs`). created_at/host: filled by ``record()``.
    """

    op: str
    kernel: str
    config: dict
    features: dict
    bucket: dict
    status: str
    p50_us: float | None
    p20_us: float | None
    p80_us: float | None
    reps: int | None
    metrics: dict
    error: str | None
    fingerprint: str
    platform: dict
    libs: dict
    study: str | None = None
    trial_number: int | None = None
    created_at: dt.datetime | None = None
    host: str | None = None

    @classmethod
    def for_platform(
        cls, platform: Platform, *, requires: Iterable[str] = (), **fields: Any
    ) -> TrialRecord:
        """A record with fingerprint/platform/libs filled from ``platform``.

        ``requires``: the kernel's provider distributions (``Kernel.requires`` keys);
        libs = :func:`relevant_libs` of them. Every other field is a keyword."""
        hw = {k: v for k, v in platform.as_dict().items() if k != "libs"}
        fields.setdefault("libs", relevant_libs(platform, requires))
        return cls(fingerprint=platform.fingerprint(), platform=hw, **fields)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.created_at is not None:
            out["created_at"] = self.created_at.isoformat()
        return out


@dataclass(kw_only=True)
class TrialRow(TrialRecord):
    """A stored trial: a :class:`TrialRecord` plus its row id and content hash."""

    id: int
    content_hash: str


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrialRecord))
# What makes two rows the same trial (merge dedupe). ``host`` is informational and was
# added by revision 0002, so hashes of rows written before it stay valid.
IDENTITY_FIELDS: tuple[str, ...] = tuple(f for f in RECORD_FIELDS if f != "host")


def relevant_libs(platform: Platform, requires: Iterable[str] = ()) -> dict[str, str]:
    """Versions a measurement depends on: torch, triton and the kernel's providers."""
    names = [*BASE_LIBS, *requires]
    return {n: platform.libs[n] for n in names if n in platform.libs and n not in IGNORED_LIBS}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def bucket_key(bucket: Mapping[str, Any]) -> str:
    """Canonical JSON of a bucket (sorted keys, no spaces): the indexed lookup key."""
    return _canonical(dict(bucket))


def config_key(config: Mapping[str, Any]) -> str:
    """Canonical JSON of a config (sorted keys, no spaces)."""
    return _canonical(dict(config))


def as_utc(value: dt.datetime) -> dt.datetime:
    """``value`` as an aware UTC datetime (naive values are taken to be UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def content_hash(record: TrialRecord) -> str:
    """sha256 of the record's identity fields (canonical JSON, created_at in UTC)."""
    if record.created_at is None:
        raise InvalidTrialError("content_hash needs created_at")
    identity = {f: getattr(record, f) for f in IDENTITY_FIELDS}
    identity["created_at"] = as_utc(record.created_at).isoformat()
    return hashlib.sha256(_canonical(identity).encode()).hexdigest()


# What every backend can store: PostgreSQL ``integer`` columns are 32-bit; JSON numbers
# are kept within 64 bits so a row means the same on SQLite, PostgreSQL and in other tools.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_JSON_DEPTH = 32
# Characters a name (op, kernel, study, ...) may not hold: C0/C1 controls (newline, NUL,
# escape ...) and the Unicode line/paragraph separators. Names end up in YAML comments,
# log lines and terminal tables.
_NAME_BREAKERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def shown(value: Any, limit: int = 60) -> str:
    """A bounded ``repr`` for messages (huge integers and long strings are cut, never expanded)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        return f"<integer of about {int(math.log10(abs(value)))} digits>"
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
        return repr(value)[:-1] + "...'"
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else f"<{type(value).__name__}>"
    return text if len(text) <= limit + 10 else text[: limit + 10] + "..."


def _check_text(value: str, where: str, *, name: bool = False) -> str:
    """``value`` if every backend stores it unchanged: valid UTF-8 (no lone surrogate), no
    NUL byte (PostgreSQL text cannot hold one); names also hold no line break or control."""
    if "\x00" in value:
        raise InvalidTrialError(f"{where}: NUL character at position {value.index(chr(0))} (not storable)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidTrialError(f"{where}: not valid Unicode text (lone surrogate at position {e.start})") from None
    if name:
        bad = _NAME_BREAKERS.search(value)
        if bad is not None:
            raise InvalidTrialError(
                f"{where}: control character {bad.group()!r} at position {bad.start()} (names are one line of text)"
            )
    return value


def storable_text(text: str) -> str:
    """``text`` with what no backend can store escaped (NUL, lone surrogates): for free text
    such as a kernel's error message, which must never cost the trial its row."""
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json_value(value: Any, where: str, *, nonfinite_ok: bool, depth: int = 0) -> Any:
    """``value`` as plain JSON (lists for tuples); raises InvalidTrialError naming ``where``."""
    if depth > MAX_JSON_DEPTH:
        raise InvalidTrialError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _check_text(value, where)
    if isinstance(value, int):
        if abs(value) > INT64_MAX:
            raise InvalidTrialError(f"{where}: integer {shown(value)} outside the 64-bit range")
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if not nonfinite_ok:
            raise InvalidTrialError(f"{where}: non-finite float {value!r}")
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidTrialError(f"{where}: keys must be strings, got {shown(k)}")
            _check_text(k, f"{where} key")
            out[k] = _json_value(v, f"{where}.{k[:40]}", nonfinite_ok=nonfinite_ok, depth=depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]", nonfinite_ok=nonfinite_ok, depth=depth + 1) for i, v in enumerate(value)]
    raise InvalidTrialError(f"{where}: expected a JSON value, got {type(value).__name__} {shown(value)}")


def _opt_float(record: TrialRecord, name: str) -> float | None:
    value = getattr(record, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTrialError(f"{name}: expected a number of microseconds or None, got {shown(value)}")
    try:
        value = float(value)
    except OverflowError:
        raise InvalidTrialError(f"{name}: {shown(value)} is too large for a float") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidTrialError(f"{name}: expected a finite non-negative number, got {value!r}")
    return value


def _opt_int(record: TrialRecord, name: str) -> int | None:
    value = getattr(record, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidTrialError(f"{name}: expected a non-negative int or None, got {shown(value)}")
    if value > INT32_MAX:
        raise InvalidTrialError(f"{name}: {shown(value)} is larger than {INT32_MAX} (a 32-bit column)")
    return int(value)


def _opt_str(record: TrialRecord, name: str, limit: int | None = None, *, is_name: bool = False) -> str | None:
    value = getattr(record, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidTrialError(f"{name}: expected a string or None, got {shown(value)}")
    if limit is not None and len(value) > limit:
        raise InvalidTrialError(f"{name}: longer than {limit} characters")
    return _check_text(value, name, name=is_name)


def _req_str(record: TrialRecord, name: str, limit: int) -> str:
    value = getattr(record, name)
    if not isinstance(value, str) or not value:
        raise InvalidTrialError(f"{name}: expected a non-empty string, got {shown(value)}")
    if len(value) > limit:
        raise InvalidTrialError(f"{name}: longer than {limit} characters")
    return _check_text(value, name, name=True)


def _req_obj(record: TrialRecord, name: str, *, nonfinite_ok: bool = False) -> dict:
    value = getattr(record, name)
    if not isinstance(value, Mapping):
        raise InvalidTrialError(f"{name}: expected a JSON object (dict), got {type(value).__name__}")
    return _json_value(value, name, nonfinite_ok=nonfinite_ok)


def _utc_time(created: Any) -> dt.datetime:
    if not isinstance(created, dt.datetime):
        raise InvalidTrialError(f"created_at: expected a datetime, got {shown(created)}")
    try:
        return as_utc(created)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before year 1 in UTC
        raise InvalidTrialError(f"created_at: {created.isoformat()} is out of range in UTC") from None


def normalize_record(record: TrialRecord, *, stamp: bool = True) -> TrialRecord:
    """A validated copy of ``record`` in stored form (floats as float, UTC time).

    stamp: fill ``created_at`` (now, UTC) and ``host`` when they are None."""
    if not isinstance(record.status, str) or record.status not in STATUSES:
        raise InvalidTrialError(f"status: expected one of {STATUSES}, got {shown(record.status)}")
    libs = _req_obj(record, "libs")
    for name, version in libs.items():
        if not isinstance(version, str):
            raise InvalidTrialError(f"libs.{name[:40]}: expected a version string, got {shown(version)}")
        _check_text(name, "libs key", name=True)
        _check_text(version, f"libs.{name}", name=True)
    created = record.created_at
    if created is None:
        if not stamp:
            raise InvalidTrialError("created_at: missing")
        created = dt.datetime.now(dt.timezone.utc)
    out = TrialRecord(
        op=_req_str(record, "op", 128),
        kernel=_req_str(record, "kernel", 128),
        config=_req_obj(record, "config"),
        features=_req_obj(record, "features"),
        bucket=_req_obj(record, "bucket"),
        status=record.status,
        p50_us=_opt_float(record, "p50_us"),
        p20_us=_opt_float(record, "p20_us"),
        p80_us=_opt_float(record, "p80_us"),
        reps=_opt_int(record, "reps"),
        metrics=_req_obj(record, "metrics", nonfinite_ok=True),
        error=_opt_str(record, "error"),
        fingerprint=_req_str(record, "fingerprint", 128),
        platform=_req_obj(record, "platform"),
        libs=libs,
        study=_opt_str(record, "study", 256, is_name=True),
        trial_number=_opt_int(record, "trial_number"),
        created_at=_utc_time(created),  # microseconds: what SQLite and PostgreSQL both keep
        host=_opt_str(record, "host", 255, is_name=True),
    )
    if out.host is None and stamp:
        out.host = socket.gethostname()[:255] or None
    if out.status == "ok" and out.p50_us is None:
        raise InvalidTrialError("p50_us: required when status is 'ok'")
    if len(bucket_key(out.bucket)) > 1024:
        raise InvalidTrialError("bucket: canonical JSON longer than 1024 characters")
    return out


def stored_values(record: TrialRecord) -> dict[str, Any]:
    """The column values of a normalized record: its fields, bucket key and content hash."""
    values = {f: getattr(record, f) for f in RECORD_FIELDS}
    values["bucket_key"] = bucket_key(record.bucket)
    values["content_hash"] = content_hash(record)
    return values
