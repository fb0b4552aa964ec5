"""One generation's SD3 state, kept on A1111's processing object as ``p.sd3``.

The script resolves the options once per generation (``process``) into :attr:`Generation.options`;
features keep what they decide and observe next to it (``sampling``, ``slg``, ``t5``) and read it from
``p.sd3``. Code that runs inside sampling without ``p`` (a scheduler, the denoiser, a forward hook) reads
:meth:`Generations.running`. A1111 runs one generation at a time, under its queue lock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

ATTRIBUTE = "sd3"
"""The processing object's attribute that holds the generation (``p.sd3``)."""


@dataclasses.dataclass
class Generation:
    options: Mapping[str, Any]  # option name -> resolved value (lib_sd3.webui.options), read-only
    sampling: Any = None  # lib_sd3.webui.samplers: the flow/guard choice and what sampling did
    slg: Any = None  # lib_sd3.webui.slg: the SLG run, None while SLG is off
    t5: Any = None  # lib_sd3.webui.t5: the generation's "SD3 T5" entry
    controlnet: Any = None  # lib_sd3.webui.controlnet: the units loaded for it, None without ControlNet


class Generations:
    """The generation in progress and the last one finished (for ``/sd3/status``)."""

    def __init__(self) -> None:
        self._running: Generation | None = None
        self.last: Generation | None = None

    def start(self, p: Any, options: Mapping[str, Any]) -> Generation:
        """A new generation on ``p`` with its resolved options; it is the one running from now on."""
        generation = Generation(MappingProxyType(dict(options)))
        setattr(p, ATTRIBUTE, generation)
        self._running = generation
        return generation

    def of(self, p: Any) -> Generation:
        """``p``'s generation (started with no options when the script's ``process`` did not run first)."""
        generation = getattr(p, ATTRIBUTE, None)
        if not isinstance(generation, Generation):
            return self.start(p, {})
        self._running = generation
        return generation

    def running(self) -> Generation | None:
        return self._running

    def finish(self, p: Any | None = None) -> None:
        """``postprocess``: the generation is over; its state stays on ``p`` and as :attr:`last`."""
        generation = getattr(p, ATTRIBUTE, None) if p is not None else self._running
        self.last = generation if isinstance(generation, Generation) else self._running
        self._running = None


GENERATIONS = Generations()
