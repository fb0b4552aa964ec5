"""Fakes of A1111's script machinery (modules/scripts.py, script_loading.py, errors.py) as of v1.10 / dev.

Shaped like the real code on both states (``ScriptRunner`` is identical on dev and the early SD3
branch 34b4443c): a hook runs for the always-on scripts whose *class* overrides ``Script``'s method,
each gets ``p.script_args[args_from:args_to]``, and an exception from one script is reported with
``errors.report("Error running <hook>: <filename>", exc_info=True)`` and the loop goes on. The processing
object and ``process_images`` are in a1111/processing.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import traceback
from typing import Any

AlwaysVisible = object()


class Errors:
    """``modules.errors``: ``report`` prints ``*** message`` and the traceback; here it also records."""

    def __init__(self) -> None:
        self.reported: list[tuple[str, str]] = []  # (message, formatted exception)

    def report(self, message: str, *, exc_info: bool = False) -> None:
        self.reported.append((message, traceback.format_exc() if exc_info else ""))


ERRORS = Errors()


class Script:
    """``modules.scripts.Script``: every hook exists and does nothing."""

    filename = None
    args_from = None
    args_to = None
    alwayson = False
    tabname = None
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def before_hr(self, p, *args):
        pass

    def post_sample(self, p, ps, *args):
        pass

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass


@dataclasses.dataclass
class PostSampleArgs:
    samples: Any


@dataclasses.dataclass
class PostprocessImageArgs:
    image: Any


class ScriptRunner:
    """``modules.scripts.ScriptRunner``: the hooks that a txt2img / img2img generation calls."""

    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.alwayson_scripts: list[Script] = []

    def add(self, script: Script, args: list[Any], filename: str, is_img2img: bool = False) -> None:
        """What ``initialize_scripts`` + ``setup_ui`` do for one always-on script: place its args."""
        script.filename = filename
        script.tabname = "img2img" if is_img2img else "txt2img"
        script.alwayson = True
        script.args_from = sum(len(s.default_args) for s in self.alwayson_scripts)
        script.args_to = script.args_from + len(args)
        script.default_args = list(args)
        self.scripts.append(script)
        self.alwayson_scripts.append(script)

    def script_args(self, **overrides: list[Any]) -> list[Any]:
        """All scripts' args in order, with ``title -> args`` overrides (the API's ``alwayson_scripts``)."""
        out: list[Any] = []
        for script in self.alwayson_scripts:
            out += overrides.get(script.title(), script.default_args)
        return out

    def ordered_scripts(self, method_name: str) -> list[Script]:
        return [s for s in self.alwayson_scripts
                if getattr(s.__class__, method_name, None) != getattr(Script, method_name, None)]

    def _each(self, hook: str, p: Any, *lead: Any, **kwargs: Any) -> None:
        for script in self.ordered_scripts(hook):
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, hook)(p, *lead, *script_args, **kwargs)
            except Exception:
                ERRORS.report(f"Error running {hook}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def before_hr(self, p):
        self._each("before_hr", p)

    def post_sample(self, p, ps):
        self._each("post_sample", p, ps)

    def postprocess_image(self, p, pp):
        self._each("postprocess_image", p, pp)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)


def load_script_module(path: str, basedir: str) -> Any:
    """``script_loading.load_module`` inside ``load_scripts``: named after the file, with the extension's
    folder on ``sys.path`` only while the module body runs; never put in ``sys.modules``."""
    saved = sys.path
    sys.path = [basedir] + sys.path
    try:
        spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path = saved
