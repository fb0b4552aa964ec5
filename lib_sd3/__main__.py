"""Command-line entry point: ``python -m lib_sd3 doctor --webui PATH``."""

import sys

from lib_sd3.cli import main

sys.exit(main())
