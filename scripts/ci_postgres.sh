#!/usr/bin/env bash
# Make PostgreSQL server binaries (initdb, pg_ctl) available for the tuning-store tests.
# The test fixture (tests/tuning_db/conftest.py) starts its own throwaway server on
# 127.0.0.1 from them; nothing here starts or configures a server.
set -euo pipefail

find_initdb() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
      echo "$dir/initdb"
      return 0
    fi
  done
  command -v initdb 2>/dev/null && command -v pg_ctl >/dev/null 2>&1
}

if initdb_path="$(find_initdb)"; then
  echo "ci_postgres: found ${initdb_path}"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "ci_postgres: initdb not found and not root (no sudo): install Debian's 'postgresql' package" >&2
    exit 1
  fi
fi

echo "ci_postgres: installing Debian's postgresql package"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null

if initdb_path="$(find_initdb)"; then
  echo "ci_postgres: installed ${initdb_path}"
else
  echo "ci_postgres: postgresql installed but initdb/pg_ctl not found" >&2
  exit 1
fi
