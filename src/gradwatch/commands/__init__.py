"""Subcommands of the ``gradwatch`` CLI: one module each, with ``add_parser`` and ``run``."""
