"""Where the tuning database lives (light: platformdirs only, no SQLAlchemy).

``KERNMUX_DB`` may hold a SQLAlchemy URL (``postgresql+psycopg://user@host/db``,
``sqlite:////abs/path.sqlite``) or a plain file path, which means SQLite at that path.
Unset, the database is ``<user cache dir>/kernmux/tuning.sqlite``.
"""

from __future__ import annotations

import os
import pathlib

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
    if not rest or rest == ":memory:":
        return None
    return pathlib.Path(rest)
