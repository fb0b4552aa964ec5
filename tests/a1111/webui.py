"""Fakes of A1111's ``modules`` package, shaped like the real ones, for adapter tests.

A1111 cannot be installed in CI, so tests put a small ``modules`` package into ``sys.modules``
with only what the adapter touches. Each test module adds the shapes it needs (for example
``sd_hijack`` as on the early SD3 branch and as on dev) with :meth:`FakeWebUI.module`.
The opt-in suite under tests/webui/ checks the same code against a real A1111.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any


class Options:
    """Like ``shared.opts``: ``data`` dict, attribute access, ``add_option`` records OptionInfo."""

    def __init__(self) -> None:
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key: str, info: Any) -> None:
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.data[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self.data[key] = value


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False, category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section, self.infotext = section, infotext
        self.comment_after = comment_after

    def info(self, text: str) -> OptionInfo:
        self.comment_after += f"<span class='info'>({text})</span>"
        return self


class Component:
    """A fake gradio component or block: records its arguments; usable as a context manager."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        self.value = kwargs.get("value")

    def __enter__(self) -> Component:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def click(self, *args: Any, **kwargs: Any) -> None:
        return None

    change = focus = click


def fake_gradio() -> types.ModuleType:
    gradio = types.ModuleType("gradio")
    for name in ("Accordion", "Row", "Column", "Group", "HTML", "Markdown", "Button", "Checkbox", "Dropdown", "Radio",
                 "Slider", "Textbox", "JSON", "State", "Image", "Tabs", "Tab"):
        setattr(gradio, name, type(name, (Component,), {}))
    gradio.update = lambda **kwargs: kwargs
    return gradio


class FakeWebUI:
    """A ``modules`` package in ``sys.modules``; removed again by the ``fake_webui`` fixture."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list] = {}
        self._outside: dict[str, Any] = {}  # modules outside ``modules`` (extensions' own): what was there before
        self._saved = {k: v for k, v in sys.modules.items() if k == "modules" or k.startswith("modules.")}
        for k in self._saved:
            del sys.modules[k]
        self._saved_gradio = sys.modules.get("gradio")
        sys.modules["gradio"] = fake_gradio()
        self.module("modules")
        self.shared = self.module("modules.shared", opts=Options(), OptionInfo=OptionInfo, sd_model=None,
                                  cmd_opts=types.SimpleNamespace())
        callbacks = {}
        for name in ("app_started", "model_loaded", "ui_settings", "script_unloaded", "before_token_counter",
                     "before_ui", "infotext_pasted"):
            callbacks[f"on_{name}"] = self._recorder(name)
        self.script_callbacks = self.module("modules.script_callbacks", **callbacks)

    def _recorder(self, name: str):
        def register(callback, *, name_=None, **_kwargs):
            self.callbacks.setdefault(name, []).append(callback)

        return register

    def fire(self, name: str, *args: Any) -> None:
        for callback in self.callbacks.get(name, []):
            callback(*args)

    def module(self, dotted: str, **attrs: Any) -> types.ModuleType:
        """Create (or extend) ``modules.x.y`` with ``attrs``, parents included.

        A name outside ``modules`` (a built-in extension's ``networks``, ...) is replaced for the test and put
        back on close."""
        parts = dotted.split(".")
        if parts[0] != "modules":
            self.drop_on_close(parts[0])
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            replaced = name in self._outside and self._outside[name] is sys.modules.get(name)  # a real one: faked
            if name not in sys.modules or replaced:
                module = types.ModuleType(name)
                module.__path__ = []  # a package, so children import
                sys.modules[name] = module
                if i > 1:
                    setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], module)
        module = sys.modules[dotted]
        for key, value in attrs.items():
            setattr(module, key, value)
        return module

    def load_source(self, root: str | Path, dotted: str) -> types.ModuleType:
        """Execute A1111's own ``root/modules/x/y.py`` as ``modules.x.y`` inside the fake package."""
        parent, _, leaf = dotted.rpartition(".")
        self.module(parent)
        spec = importlib.util.spec_from_file_location(dotted, Path(root, *dotted.split(".")).with_suffix(".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[dotted] = module
        setattr(sys.modules[parent], leaf, module)
        spec.loader.exec_module(module)
        return module

    def drop_on_close(self, package: str) -> None:
        """``package`` and its submodules (an extension's, imported during the test) leave ``sys.modules`` on close;
        whatever was there before comes back."""
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")] or [package]:
            self._outside.setdefault(name, sys.modules.get(name))

    def close(self) -> None:
        for k in [k for k in sys.modules if k == "modules" or k.startswith("modules.")]:
            del sys.modules[k]
        sys.modules.update(self._saved)
        packages = {name.split(".")[0] for name in self._outside}
        for k in [k for k in sys.modules if k.split(".")[0] in packages]:
            del sys.modules[k]
        sys.modules.update({k: v for k, v in self._outside.items() if v is not None})
        if self._saved_gradio is None:
            sys.modules.pop("gradio", None)
        else:
            sys.modules["gradio"] = self._saved_gradio
