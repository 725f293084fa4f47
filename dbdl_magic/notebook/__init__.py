"""The notebook front: magics, monitors (widgets, text), static figures, the DataFrame
accessor and executed-notebook reports. It talks to :mod:`dbdl_magic.api` and the public
types (options, errors, events, display) only.
"""
