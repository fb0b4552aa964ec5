"""sd-webui-sd3: make Stable Diffusion 3 work properly inside the AUTOMATIC1111 WebUI.

Everything in this package except :mod:`lib_sd3.webui` is a pure library: it never imports
A1111's ``modules`` so it can be tested, benchmarked and reused without a running WebUI.
"""

import logging

__version__ = "0.1.0"

LOGGER_NAME = "sd_webui_sd3"
"""One logger for the whole extension, so users can filter or silence it in one place."""


def get_logger(child: str | None = None) -> logging.Logger:
    """Return the extension's logger (or a child of it) with a console handler set up once."""
    root = logging.getLogger(LOGGER_NAME)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[SD3] %(levelname)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root.getChild(child) if child else root
