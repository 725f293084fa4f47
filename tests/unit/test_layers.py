"""The package's folders are its layers: import-linter checks the contracts in .importlinter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    kept = [line for line in out.stdout.splitlines() if line.rstrip().endswith("KEPT")]
    # layers, kernel, notebook, backends, vocabulary, display, notebook-modules
    assert len(kept) == 7, out.stdout


def test_kernel_imports_without_the_rest_of_the_package():
    """What the database server's python3 imports: the kernels and nothing of the fronts."""
    code = (
        "import sys, dbdl_magic.kernel.plpython, dbdl_magic.kernel.blockstore;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('pandas', 'sqlalchemy', 'IPython', 'ipywidgets', 'matplotlib')"
        " or (m.startswith('dbdl_magic.') and not m.startswith('dbdl_magic.kernel')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_layer_table_lists_every_module():
    text = (ROOT / "README.md").read_text()
    start, end = text.index("<!-- layer-table"), text.index("<!-- /layer-table -->")
    table = text[start:end]
    missing = []
    for path in sorted((ROOT / "dbdl_magic").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(ROOT / "dbdl_magic")
        folder = f"`{rel.parent}/`" if rel.parent.name else None
        if f"`{rel.name}`" not in table or (folder and folder not in table):
            missing.append(str(rel))
    assert missing == [], f"README layer table misses {missing}"
    folders = {p.parent.name for p in (ROOT / "dbdl_magic").rglob("*.py")} - {"dbdl_magic"}
    listed = {f for f in folders if f"`{f}/`" in table or f == "sql"}
    assert listed == folders
