"""The extension's one patch registry; feature modules add their patches to it."""

from lib_sd3.patching import PatchRegistry

REGISTRY = PatchRegistry()
