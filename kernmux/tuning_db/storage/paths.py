"""Where the tuning database lives (light: platformdirs only, no SQLAlchemy).

``KERNMUX_DB`` may hold a SQLAlchemy URL (``postgresql+psycopg://user@host/db``,
``sqlite:////abs/path.sqlite``) or a plain file path, which means SQLite at that path.
Unset, the database is ``<user cache dir>/kernmux/tuning.sqlite``.

A SQLite URL may end in ``?mode=ro`` (open read-only) or ``?immutable=1`` (read-only,
and the file is taken never to change: no locks, for a read-only mount); kernmux reads
those two options itself (:func:`sqlite_options`).
"""

from __future__ import annotations

import os
import pathlib
import urllib.parse

ENV_VAR = "KERNMUX_DB"


def default_db_path() -> pathlib.Path:
    """The default embedded database file (it may not exist yet)."""
    import platformdirs

    return pathlib.Path(platformdirs.user_cache_dir("kernmux")) / "tuning.sqlite"


def normalize_url(url_or_path: str) -> str:
    """A SQLAlchemy URL for ``url_or_path``: URLs pass through, paths become SQLite URLs."""
    text = url_or_path.strip()
    if "://" in text:
        return text
    path = pathlib.Path(text).expanduser().resolve()
    return f"sqlite:///{path}"


def default_url() -> str:
    """``KERNMUX_DB`` (URL or path) if set, else SQLite at :func:`default_db_path`."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return normalize_url(env)
    return f"sqlite:///{default_db_path()}"


def sqlite_path(url: str) -> pathlib.Path | None:
    """The file behind a SQLite URL, or None (other backends, in-memory SQLite)."""
    if not url.startswith("sqlite"):
        return None
    _, _, rest = url.partition(":///")
    rest = rest.split("?", 1)[0]
    if rest.startswith("file:"):  # sqlite:///file:/path?...&uri=true
        rest = urllib.parse.unquote(rest[len("file:"):])
    if not rest or rest == ":memory:" or is_memory_url(url):
        return None
    return pathlib.Path(rest)


def sqlite_options(url: str) -> dict[str, str]:
    """The query options of a SQLite URL (``{"mode": "ro"}`` for ``...?mode=ro``)."""
    if not url.startswith("sqlite"):
        return {}
    _, _, query = url.partition("?")
    return {k.lower(): v for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)}


def is_memory_url(url: str) -> bool:
    """True for an in-memory SQLite database (``sqlite://``, ``sqlite:///:memory:``,
    ``mode=memory``): it ends with the process that opened it."""
    if not url.startswith("sqlite"):
        return False
    _, sep, rest = url.partition(":///")
    rest = rest.split("?", 1)[0]
    if not sep or not rest or rest in (":memory:", "file::memory:"):
        return True
    return sqlite_options(url).get("mode") == "memory"


def persistence_problem(url: str) -> str:
    """"" for a database that outlives this process, else why it does not (for commands
    whose point is to keep what they write: tune, import, merge, upgrade)."""
    if is_memory_url(url):
        return (
            f"{url} is an in-memory database: what this command writes would vanish when it "
            f"exits; give a file path or a database URL"
        )
    return ""
