"""In-database kernels: pure functions over bytes.

This package runs inside the database server's Python (PL/Python on PostgreSQL, the client's
interpreter for SQLite). It may import only torch, numpy, safetensors and zstandard: never
IPython, pandas, matplotlib or the rest of ``dbdl_magic``.
"""

KERNEL_VERSION = "5"
