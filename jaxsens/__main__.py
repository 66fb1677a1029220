"""``python -m jaxsens``: the command line (see :mod:`jaxsens.cli`)."""

import sys

from .cli import main

sys.exit(main())
