"""Fake of the ControlNet extension's scripts/supported_preprocessor.py (56cec5b): the registry and the call."""

from typing import Any, NamedTuple

import numpy as np


class Preprocessor:
    all_processors = {}  # label -> preprocessor
    all_processors_by_name = {}

    name = "none"
    _label = None
    tags = ()
    returns_image = True

    def __init__(self, name, label=None, tags=(), returns_image=True):
        self.name, self._label, self.tags, self.returns_image = name, label, list(tags), returns_image
        self.calls = []

    @property
    def label(self):
        return self._label if self._label is not None else self.name

    @classmethod
    def add_supported_preprocessor(cls, p):
        cls.all_processors[p.label] = p
        cls.all_processors_by_name[p.name] = p

    @classmethod
    def get_preprocessor(cls, name):
        return cls.all_processors.get(name, cls.all_processors_by_name.get(name, None))

    class Result(NamedTuple):
        value: Any
        display_images: list

    def cached_call(self, input_image, *args, **kwargs):
        self.calls.append(kwargs)
        result = self(input_image, *args, **kwargs)
        return Preprocessor.Result(value=result, display_images=[result if self.returns_image else input_image])

    def __call__(self, input_image, resolution, slider_1=None, slider_2=None, slider_3=None, input_mask=None,
                 **kwargs):
        return input_image


class Canny(Preprocessor):
    def __call__(self, input_image, resolution, slider_1=None, slider_2=None, **kwargs):
        grey = input_image.mean(axis=2)
        edges = np.abs(np.diff(grey, axis=1, prepend=grey[:, :1])) > slider_1 / 4
        return (edges * 255).astype(np.uint8)  # H x W, as the real canny returns


class Midas(Preprocessor):
    def __call__(self, input_image, resolution, **kwargs):
        return input_image.mean(axis=2).astype(np.uint8)  # near = bright stand-in: H x W


class ClipVision(Preprocessor):
    def __call__(self, input_image, resolution, **kwargs):
        return {"image_embeds": np.zeros(4)}


Preprocessor.add_supported_preprocessor(Preprocessor("none"))
Preprocessor.add_supported_preprocessor(Canny("canny", tags=["Canny"]))
Preprocessor.add_supported_preprocessor(Midas("depth", label="depth_midas", tags=["Depth"]))
Preprocessor.add_supported_preprocessor(ClipVision("clip_vision", tags=["IP-Adapter"], returns_image=False))
