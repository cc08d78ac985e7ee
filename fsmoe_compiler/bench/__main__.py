"""``python -m fsmoe_compiler.bench``: the ``fsmoe bench`` subcommand on its own."""

import sys

from .cli import main

sys.exit(main())
