#!/usr/bin/env bash
# Set up and run the demo: scripts/demo.sh [dbdl demo args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
exec .venv/bin/dbdl demo "$@"
