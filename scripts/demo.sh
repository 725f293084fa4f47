#!/usr/bin/env bash
# Main job: set up, then execute notebooks/quickstart.ipynb headless (it trains a classifier
# inside the embedded SQLite database) and save the executed notebook as an HTML report.
# Usage: scripts/demo.sh [extra `dbdl report` flags, e.g. --hide-input]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

# The notebook's working directory (its ./dbdl.db lands there): fresh every run, under build/
# (git-ignored), so the repository stays clean.
SCRATCH=build/quickstart-run
rm -rf "$SCRATCH"
mkdir -p "$SCRATCH"

echo "demo: executing notebooks/quickstart.ipynb in $SCRATCH (about half a minute)"
.venv/bin/dbdl report notebooks/quickstart.ipynb -o build/quickstart.html --cwd "$SCRATCH" "$@"

# The notebook's deterministic summary line, read back from the executed notebook.
.venv/bin/python - build/quickstart.ipynb <<'PY'
import sys

import nbformat

nb = nbformat.read(sys.argv[1], as_version=4)
for cell in nb.cells:
    if cell.cell_type == "code" and cell.source.startswith("# NBVAL_CHECK_OUTPUT"):
        for output in cell.outputs:
            print("demo:", output.get("text", "").strip())
PY
echo "demo: open the report in a browser: file://$(pwd -P)/build/quickstart.html"
