"""The ``andromeda`` command line: one module per group of commands."""
