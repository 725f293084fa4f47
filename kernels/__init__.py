"""The PostgreSQL install script (``postgres/install.sql``), packaged as ``dbdl_magic.sql``.

pyproject.toml maps the package ``dbdl_magic.sql`` onto this folder, so a wheel carries the
script and ``dbdl_magic.backends.postgres.install_sql`` reads it with importlib.resources.
"""
