"""sd-webui-sd3: make Stable Diffusion 3 work properly inside the AUTOMATIC1111 WebUI.

What this package promises:

* Everything outside :mod:`lib_sd3.webui` is a pure library: it never imports A1111's ``modules``
  (a test enforces it), so it can be tested, benchmarked and reused without a running WebUI.
* It does know A1111's shapes. :mod:`~lib_sd3.sd3_state`, :mod:`~lib_sd3.targets`,
  :mod:`~lib_sd3.doctor`, :mod:`~lib_sd3.requirements` and :mod:`~lib_sd3.iclight` describe A1111
  (and the IC-Light extension) as read from their source files or seen by duck typing on objects
  handed in, and :mod:`lib_sd3.tokens` counts tokens by A1111's rules. They stay where they are rather
  than in an ``a1111`` sub-package: what marks them is what they know, not what they import.
* Only :mod:`lib_sd3.webui` touches the running A1111, by feature detection, through reversible
  patches (:mod:`lib_sd3.patching`, :mod:`lib_sd3.webui.registry`).
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
