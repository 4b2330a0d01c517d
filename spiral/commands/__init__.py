"""Wiring: the ``spiral`` command and its subcommands. Nothing outside this package imports it."""
