"""Per-family presets in the WebUI: an accordion button that fills the generation fields, and an API route.

Never forced: nothing changes until the user clicks "Apply preset" (or an API client copies a preset's
``txt2img`` fields into its request). The button sets A1111's own steps / CFG / sampler / scheduler
fields, found by their ``elem_id`` as A1111 creates them (``Script.after_component``: they may come
before or after the accordion, depending on the user's UI order), and the accordion's SLG fields.
"""

from __future__ import annotations

from typing import Any

from lib_sd3 import get_logger
from lib_sd3.models import family_presets as presets
from lib_sd3.webui import hooks, options
from lib_sd3.webui.capabilities import loaded_model, model_is_sd3

log = get_logger("presets")

LOADED = "for the loaded model"
"""The preset dropdown's first choice: the loaded model's family, read when the button is clicked."""

A1111_FIELDS = {"steps": "{tab}_steps", "cfg_scale": "{tab}_cfg_scale", "sampler": "{tab}_sampling",
                "scheduler": "{tab}_scheduler"}
"""Preset field -> elem_id of the A1111 component it sets (the same on dev and the early SD3 branch)."""

SLG_ARGS = options.PRESET_SET
"""The accordion's fields a preset sets (the options table's rows with a preset value)."""


def loaded_family() -> str | None:
    """The loaded SD3 model's family name (set by the SD3.5 loader), SD3 Medium for A1111's plain SD3."""
    model = loaded_model()
    if not model_is_sd3(model):
        return None
    family = getattr(model, "sd3_family", None)
    return getattr(family, "name", None) or presets.DEFAULT_FAMILY


def pick(choice: str) -> presets.Preset:
    return presets.for_family(loaded_family() if choice == LOADED else choice)


def field_values(preset: presets.Preset) -> dict[str, Any]:
    """What the button writes: A1111's fields and the accordion's SLG fields (None: leave as it is; a family
    without SLG turns it off and clears the layers field back to the setting's)."""
    return {"steps": preset.steps, "cfg_scale": preset.cfg_scale, "sampler": preset.sampler,
            "scheduler": preset.scheduler, **options.preset_values(preset)}


class PresetButton:
    """The accordion's preset dropdown and button for one tab, wired once every target field exists."""

    def __init__(self, tab: str) -> None:
        self.tab = tab
        self.targets: dict[str, Any] = {}
        self.slg_fields: dict[str, Any] = {}
        self.choice: Any = None
        self.button: Any = None
        self.wired = False

    def saw(self, component: Any, elem_id: str | None) -> None:
        """``Script.after_component``: keep A1111's fields that a preset sets."""
        for name, pattern in A1111_FIELDS.items():
            if elem_id == pattern.format(tab=self.tab):
                self.targets[name] = component
                self.wire()

    def build(self, slg_fields: dict[str, Any]) -> None:
        import gradio as gr

        self.slg_fields = {name: slg_fields[name] for name in SLG_ARGS}
        with gr.Row():
            self.choice = gr.Dropdown(label="Preset (steps, CFG, sampler, schedule, SLG)",
                                      choices=[LOADED, *presets.PRESETS], value=LOADED,
                                      elem_id=f"sd3_preset_{self.tab}")
            self.button = gr.Button("Apply preset", elem_id=f"sd3_apply_preset_{self.tab}")
        self.wire()

    def wire(self) -> None:
        if self.wired or self.button is None or set(self.targets) != set(A1111_FIELDS):
            return
        import gradio as gr

        outputs = {**self.targets, **self.slg_fields}
        names = list(outputs)

        def apply(choice: str) -> list[Any]:
            try:
                values = field_values(pick(choice))
            except KeyError as error:
                log.warning("%s", error.args[0])
                return [gr.update() for _ in names]
            return [gr.update() if values[name] is None else gr.update(value=values[name]) for name in names]

        self.button.click(fn=apply, inputs=[self.choice], outputs=[outputs[name] for name in names],
                          show_progress=False)
        self.wired = True


def presets_route() -> dict[str, Any]:
    return {"loaded_family": loaded_family(), "default_family": presets.DEFAULT_FAMILY,
            "presets": {name: presets.as_dict(p) for name, p in presets.PRESETS.items()}}


def _routes(router: Any) -> None:
    router.add_api_route("/presets", presets_route, methods=["GET"])


DECLARED = hooks.Feature("presets", routes=(_routes,))
