"""``python -m gradwatch``: the ``gradwatch`` command (:func:`gradwatch.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":  # pragma: no branch
    sys.exit(main())
