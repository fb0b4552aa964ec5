"""Per-family presets: the table matches Stability's reference configs, and every preset is valid input."""

from __future__ import annotations

import types

import pytest
from a1111.models import Model

from lib_sd3.models import family_presets as presets
from lib_sd3.webui import preset_button as webui_presets
from lib_sd3.webui import script_args

REFERENCE = {  # Stability-AI/sd3.5 sd3_infer.py CONFIGS (SD3.5 Medium: the skip_layer_config's cfg, SLG on)
    "sd3-medium": (50, 5.0, "DPM++ 2M", None),
    "sd3.5-large": (40, 4.5, "DPM++ 2M", None),
    "sd3.5-large-turbo": (4, 1.0, "Euler", None),
    "sd3.5-medium": (50, 4.0, "DPM++ 2M", ((7, 8, 9), 2.5, 0.01, 0.20)),
}


@pytest.mark.parametrize("family", sorted(REFERENCE))
def test_table_is_the_reference(family):
    preset = presets.PRESETS[family]
    steps, cfg, sampler, slg = REFERENCE[family]
    assert (preset.steps, preset.cfg_scale, preset.sampler, preset.scheduler) == (steps, cfg, sampler, "Uniform")
    assert preset.shift == 3.0
    assert (None if preset.slg is None else (preset.slg.layers, preset.slg.scale, preset.slg.start, preset.slg.end)) == slg


@pytest.mark.parametrize("family", sorted(REFERENCE))
def test_every_preset_is_valid_api_input(family):
    fields = presets.PRESETS[family].txt2img_fields()
    values = script_args.check_request(fields["alwayson_scripts"]["SD3"])
    assert values["slg"] == ("on" if presets.PRESETS[family].slg else "off")
    ui = webui_presets.field_values(presets.PRESETS[family])
    script_args.parse(({k: v for k, v in ui.items() if k in script_args.NAMES and v is not None},))


def test_missing_family_is_sd3_medium_unknown_is_an_error():
    assert presets.for_family(None).family == "sd3-medium"
    with pytest.raises(KeyError, match="sd3.5-large"):
        presets.for_family("sdxl")


def test_loaded_family_and_route(fake_webui):
    assert webui_presets.loaded_family() is None  # nothing loaded
    fake_webui.shared.sd_model = Model("SD3")
    assert webui_presets.loaded_family() == "sd3-medium"  # A1111's own SD3: no family attribute
    fake_webui.shared.sd_model.sd3_family = types.SimpleNamespace(name="sd3.5-medium")
    assert webui_presets.pick(webui_presets.LOADED).slg is not None
    answer = webui_presets.presets_route()
    assert answer["loaded_family"] == "sd3.5-medium"
    assert set(answer["presets"]) == set(REFERENCE)
    assert answer["presets"]["sd3.5-large"]["txt2img"]["steps"] == 40


def test_button_values_set_slg_off_for_families_without_it():
    values = webui_presets.field_values(presets.PRESETS["sd3.5-large-turbo"])
    assert values == {"steps": 4, "cfg_scale": 1.0, "sampler": "Euler", "scheduler": "Uniform", "slg": "off",
                      "slg_layers": [], "slg_scale": None, "slg_start": None, "slg_end": None}  # layers cleared
    medium = webui_presets.field_values(presets.PRESETS["sd3.5-medium"])
    assert (medium["slg"], medium["slg_layers"], medium["slg_scale"]) == ("on", ["7", "8", "9"], 2.5)


@pytest.mark.parametrize("fields_first", [True, False])
def test_button_wires_whichever_comes_first(fake_webui, monkeypatch, fields_first):
    """A1111's steps/CFG/sampler/scheduler may be built before or after the accordion (the user's UI order)."""
    import gradio as gr

    clicks = []
    monkeypatch.setattr(gr.Button, "click", lambda self, **kwargs: clicks.append(kwargs), raising=False)
    button = webui_presets.PresetButton("txt2img")
    targets = {}

    def a1111_fields():
        for name, pattern in webui_presets.A1111_FIELDS.items():
            elem_id = pattern.format(tab="txt2img")
            targets[name] = gr.Textbox(elem_id=elem_id)
            button.saw(targets[name], elem_id)
            button.saw(gr.Textbox(elem_id="img2img_steps"), "img2img_steps")  # another tab's field: ignored

    if fields_first:
        a1111_fields()
    slg_fields = {name: gr.Textbox() for name in webui_presets.SLG_ARGS}
    button.build(slg_fields)
    assert button.wired is fields_first
    if not fields_first:
        a1111_fields()
    assert button.wired and len(clicks) == 1
    assert clicks[0]["inputs"] == [button.choice]
    assert clicks[0]["outputs"] == [*targets.values(), *slg_fields.values()]
    fake_webui.shared.sd_model = Model("SD3", sd3_family=types.SimpleNamespace(name="sd3.5-medium"))
    updates = clicks[0]["fn"](webui_presets.LOADED)
    assert [u.get("value") for u in updates] == [50, 4.0, "DPM++ 2M", "Uniform", "on", ["7", "8", "9"], 2.5, 0.01, 0.2]
    turbo = clicks[0]["fn"]("sd3.5-large-turbo")
    assert turbo[5] == {"value": []}  # no SLG in the preset: the layers field no longer shows the old layers
    assert turbo[6] == {}  # SLG fields other than on/off and the layers kept
