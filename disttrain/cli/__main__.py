"""`python -m disttrain.cli COMMAND ...`: what the `disttrain` command runs (used under launchers)."""

import sys

from disttrain.cli import main

sys.exit(main())
