"""The only code that touches A1111's ``modules``.

Everything here works by feature detection (``hasattr`` / signature checks) so one code base
serves the early SD3 branch (commit 34b4443c) and v1.10 / dev alike. Importing this package
does not import ``modules``; :func:`lib_sd3.webui.startup.install` does, once, from the script.
"""
