#!/usr/bin/env bash
# Idempotent set-up: PostgreSQL 15 + PL/Python and Chromium (as root), the venv with a CPU torch
# and this package, and directory permissions so the server's `postgres` OS user can import from here.
# Fast when everything is already in place.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$REPO_ROOT"

PG_VERSION=15
PG_BIN="/usr/lib/postgresql/${PG_VERSION}/bin"
TORCH_SPEC="torch==2.13.0"   # pinned first: an unpinned torch pulls a multi-GB CUDA build

is_root() { [ "$(id -u)" -eq 0 ]; }
log() { echo "setup: $*" >&2; }

# --- PostgreSQL server + PL/Python ------------------------------------------------------------
if ! dpkg -s "postgresql-plpython3-${PG_VERSION}" >/dev/null 2>&1 || [ ! -x "${PG_BIN}/postgres" ]; then
    if is_root; then
        log "installing postgresql-${PG_VERSION} and postgresql-plpython3-${PG_VERSION}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            "postgresql-${PG_VERSION}" "postgresql-plpython3-${PG_VERSION}" >/dev/null
    else
        log "WARNING: postgresql-${PG_VERSION}/postgresql-plpython3-${PG_VERSION} missing and not" \
            "root; PostgreSQL tests will be skipped (or fail on CI)"
    fi
fi
# The tests start their own throwaway clusters; the Debian 'main' cluster only costs memory.
if is_root && command -v pg_lsclusters >/dev/null 2>&1 \
        && pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" '$1==v && $2=="main" && $4=="online" {f=1} END {exit !f}'; then
    log "stopping the Debian ${PG_VERSION}/main cluster (unused)"
    pg_ctlcluster "$PG_VERSION" main stop || true
fi

# --- Chromium for the browser tests (tests/notebook/test_browser.py drives it through Playwright) -------
# Debian's package; `playwright install` needs a download that is not always possible. Optional:
# without it the browser tests skip locally (and fail on CI).
if [ ! -x /usr/bin/chromium ]; then
    if is_root; then
        log "installing chromium (for the browser tests)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
            || log "WARNING: could not install chromium; browser tests will be skipped (fail on CI)"
    else
        log "WARNING: /usr/bin/chromium missing and not root; browser tests will be skipped" \
            "(or fail on CI)"
    fi
fi

# --- virtualenv --------------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    # Debian's python3 lacks venv/ensurepip until python3-venv is installed.
    if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1 && is_root; then
        log "installing python3-venv"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    log "creating .venv"
    rm -rf .venv
    python3 -m venv .venv
fi
PYPROJECT_HASH="$(sha256sum pyproject.toml | cut -c1-16)"
STAMP=".venv/.dbdl-setup-${PYPROJECT_HASH}"
if [ ! -e "$STAMP" ]; then
    log "installing ${TORCH_SPEC} and the package (.[test]) into .venv"
    .venv/bin/pip install -q "$TORCH_SPEC"
    .venv/bin/pip install -q -e '.[test]'
    rm -f .venv/.dbdl-setup-*
    touch "$STAMP"
fi

# --- permissions for the server's OS user ------------------------------------------------------
# PL/Python runs inside the server as `postgres` and imports torch from .venv and dbdl_magic from
# the repo root, so every directory from / down to the repo must be traversable by others.
if is_root; then
    dir="$REPO_ROOT"
    while :; do
        if [ "$(( 0$(stat -c %a "$dir") & 01 ))" -eq 0 ]; then
            chmod o+x "$dir"
            log "chmod o+x $dir (so the postgres OS user can reach the repo)"
        fi
        [ "$dir" = / ] && break
        dir="$(dirname "$dir")"
    done
fi
