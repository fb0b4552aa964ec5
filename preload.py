"""Command-line flags of sd-webui-sd3 (A1111 calls ``preload`` before parsing its arguments).

The flags are declared once, in ``lib_sd3/webui/flags.py``.
"""

import argparse
import os
import sys


def preload(parser: argparse.ArgumentParser) -> None:
    root = os.path.dirname(os.path.abspath(__file__))
    if root not in sys.path:  # A1111 puts the extension's folder there for its scripts, but only later
        sys.path.insert(0, root)
    from lib_sd3.webui.flags import add_arguments

    add_arguments(parser)
