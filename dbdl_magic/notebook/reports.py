"""Notebook reports: execute a notebook headless and save it as a self-contained HTML page.

``dbdl report NOTEBOOK`` (see :mod:`dbdl_magic.cli`) calls :func:`render_notebook_report`:
the notebook runs top to bottom in a fresh ipykernel of *this* Python (whatever kernelspecs are
installed elsewhere), the executed ``.ipynb`` is written next to the HTML, and nbconvert turns it
into HTML with the images embedded as ``data:`` URIs. A failing cell still writes both files
(the error is shown in them) and then raises :class:`NotebookReportError`.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from traitlets import default

from dbdl_magic.errors import DbdlError

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotebookReportError(DbdlError):
    """A cell of the notebook failed (or timed out); ``.html``/``.notebook`` show where."""

    def __init__(self, message: str, html: Path, notebook: Path) -> None:
        super().__init__(message)
        self.html = html
        self.notebook = notebook


class ThisPythonKernelManager(AsyncKernelManager):
    """Starts the ipykernel of the running interpreter (``sys.executable``).

    With no kernel directories, jupyter_client falls back to ipykernel's built-in ``python3``
    spec, whose command is this Python; a user-level ``python3`` kernelspec pointing at another
    environment is therefore never picked up. Kernel traffic is CurveZMQ-encrypted when the
    installed jupyter_client and pyzmq support it.
    """

    @default("kernel_spec_manager")
    def _default_kernel_spec_manager(self) -> KernelSpecManager:
        return KernelSpecManager(parent=self, kernel_dirs=[])

    if "transport_encryption" in AsyncKernelManager.class_trait_names():  # jupyter_client >= 8.7

        @default("transport_encryption")
        def _default_transport_encryption(self) -> str:
            """CurveZMQ between client and kernel when pyzmq supports it (and no warning)."""
            import zmq

            return "auto" if zmq.has("curve") else "disabled"


def executed_notebook_path(source: Path, html: Path) -> Path:
    """Where the executed notebook goes: next to the HTML, never over the source notebook."""
    candidate = html.with_suffix(".ipynb")
    if candidate.resolve() == source.resolve():
        candidate = html.with_name(f"{html.stem}.executed.ipynb")
    return candidate


def _failure_message(source: Path, nb: nbformat.NotebookNode, error: Exception) -> str:
    """``NOTEBOOK: cell N failed`` with the cell's first line and the kernel's error."""
    if isinstance(error, CellTimeoutError | DeadKernelError):
        return f"{source}: {_ANSI.sub('', str(error)).strip()}"
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                trace = _ANSI.sub("", "\n".join(output.get("traceback", []))).strip()
                return (
                    f"{source}: cell {index} failed ({first})\n"
                    f"{trace or output.get('ename', '') + ': ' + output.get('evalue', '')}"
                )
    return f"{source}: {_ANSI.sub('', str(error)).strip()}"


def _drop_unused_widget_state(nb: nbformat.NotebookNode) -> None:
    """Remove stored widget state when no output shows a widget (live views are replaced by
    static reports), so the HTML needs no widget JavaScript from a CDN."""
    shown = any(
        WIDGET_VIEW in output.get("data", {})
        for cell in nb.cells
        for output in cell.get("outputs", [])
    )
    if not shown:
        nb.metadata.pop("widgets", None)


def to_html(nb: nbformat.NotebookNode, hide_input: bool = False) -> str:
    """The notebook as one HTML page (JupyterLab look); ``hide_input`` shows outputs only."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", embed_images=True)
    if hide_input:
        exporter.exclude_input = True
        exporter.exclude_input_prompt = True
        exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(nb)
    return body


def render_notebook_report(
    path: str | Path,
    out: str | Path | None = None,
    hide_input: bool = False,
    timeout: int = 600,
    cwd: str | Path | None = None,
) -> Path:
    """Execute the notebook at ``path`` and write it as HTML to ``out``; returns ``out``.

    ``out`` defaults to ``NOTEBOOK.html`` beside the notebook; the executed notebook is written
    beside ``out`` (see :func:`executed_notebook_path`). Cells run with working directory
    ``cwd`` (default: the notebook's directory), each for at most ``timeout`` seconds. Raises
    :class:`NotebookReportError` when a cell fails, after writing both files.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no notebook at {source}")
    html_path = Path(out) if out is not None else source.with_suffix(".html")
    workdir = Path(cwd) if cwd is not None else source.resolve().parent
    workdir.mkdir(parents=True, exist_ok=True)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    executed_path = executed_notebook_path(source, html_path)

    nb = nbformat.read(source, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        kernel_manager_class=ThisPythonKernelManager,
        resources={"metadata": {"path": str(workdir)}},
    )
    failure: Exception | None = None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
        failure = exc
    _drop_unused_widget_state(nb)
    nbformat.write(nb, executed_path)
    html_path.write_text(to_html(nb, hide_input=hide_input), encoding="utf-8")
    if failure is not None:
        raise NotebookReportError(
            _failure_message(source, nb, failure), html=html_path, notebook=executed_path
        ) from failure
    return html_path


__all__ = [
    "NotebookReportError",
    "ThisPythonKernelManager",
    "executed_notebook_path",
    "render_notebook_report",
    "to_html",
]
