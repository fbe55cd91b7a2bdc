"""``python -m iscam``: the command line (see :mod:`iscam.cli`)."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
