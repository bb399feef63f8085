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


def _json_value(value: Any, where: str, *, nonfinite_ok: bool) -> Any:
    """``value`` as plain JSON (lists for tuples); raises InvalidTrialError naming ``where``."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
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
                raise InvalidTrialError(f"{where}: keys must be strings, got {k!r}")
            out[k] = _json_value(v, f"{where}.{k}", nonfinite_ok=nonfinite_ok)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]", nonfinite_ok=nonfinite_ok) for i, v in enumerate(value)]
    raise InvalidTrialError(f"{where}: expected a JSON value, got {type(value).__name__} {value!r}")


def _opt_float(record: TrialRecord, name: str) -> float | None:
    value = getattr(record, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTrialError(f"{name}: expected a number of microseconds or None, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InvalidTrialError(f"{name}: expected a finite non-negative number, got {value!r}")
    return value


def _opt_int(record: TrialRecord, name: str) -> int | None:
    value = getattr(record, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidTrialError(f"{name}: expected a non-negative int or None, got {value!r}")
    return int(value)


def _opt_str(record: TrialRecord, name: str, limit: int | None = None) -> str | None:
    value = getattr(record, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidTrialError(f"{name}: expected a string or None, got {value!r}")
    if limit is not None and len(value) > limit:
        raise InvalidTrialError(f"{name}: longer than {limit} characters")
    return value


def _req_str(record: TrialRecord, name: str, limit: int) -> str:
    value = getattr(record, name)
    if not isinstance(value, str) or not value:
        raise InvalidTrialError(f"{name}: expected a non-empty string, got {value!r}")
    if len(value) > limit:
        raise InvalidTrialError(f"{name}: longer than {limit} characters")
    return value


def _req_obj(record: TrialRecord, name: str, *, nonfinite_ok: bool = False) -> dict:
    value = getattr(record, name)
    if not isinstance(value, Mapping):
        raise InvalidTrialError(f"{name}: expected a JSON object (dict), got {type(value).__name__}")
    return _json_value(value, name, nonfinite_ok=nonfinite_ok)


def normalize_record(record: TrialRecord, *, stamp: bool = True) -> TrialRecord:
    """A validated copy of ``record`` in stored form (floats as float, UTC time).

    stamp: fill ``created_at`` (now, UTC) and ``host`` when they are None."""
    if record.status not in STATUSES:
        raise InvalidTrialError(f"status: expected one of {STATUSES}, got {record.status!r}")
    libs = _req_obj(record, "libs")
    for name, version in libs.items():
        if not isinstance(version, str):
            raise InvalidTrialError(f"libs.{name}: expected a version string, got {version!r}")
    created = record.created_at
    if created is None:
        if not stamp:
            raise InvalidTrialError("created_at: missing")
        created = dt.datetime.now(dt.timezone.utc)
    elif not isinstance(created, dt.datetime):
        raise InvalidTrialError(f"created_at: expected a datetime, got {created!r}")
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
        study=_opt_str(record, "study", 256),
        trial_number=_opt_int(record, "trial_number"),
        created_at=as_utc(created),  # microseconds: what SQLite and PostgreSQL both keep
        host=_opt_str(record, "host", 255),
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
