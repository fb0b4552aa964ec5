"""The one infotext table: every SD3 field named once, and pasting an infotext restores the accordion."""

from __future__ import annotations

import pathlib
import re

import pytest

from lib_sd3.webui import infotext, options, script_args, settings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_labels_are_unique_and_every_restored_arg_has_a_reader():
    assert len(set(infotext.LABELS)) == len(infotext.LABELS)
    images = {f"controlnet_{n}_image" for n in range(1, infotext.CONTROLNET_UNITS + 1)}  # never pasted back
    restored = [o.name for o in options.OPTIONS if o.infotext in infotext.LABELS]
    assert sorted(restored) == sorted(set(script_args.NAMES) - images)  # every other field comes back
    assert {o.name for o in options.OPTIONS if o.paste is not None} == set(script_args.NAMES) - images
    units = {infotext.controlnet(f"ControlNet {n}") for n in range(1, infotext.CONTROLNET_UNITS + 1)}
    assert set(options.PASTED) == {infotext.FLOW_SAMPLERS, infotext.NAN_GUARD, infotext.MIXDQ, infotext.SLG, *units}


def test_settings_name_their_infotext_from_the_table():
    labels = {s.infotext for s in settings.SETTINGS if s.infotext}
    assert labels <= set(infotext.LABELS)


def test_no_feature_writes_an_sd3_label_of_its_own():
    """Features write ``extra_generation_params[infotext.X]`` (or ``params[infotext.X]``), never a literal
    ``["SD3 ..."]`` key: a new entry is added to the table first."""
    literal = re.compile(r"""\[\s*f?["']SD3 [A-Za-z]""")
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "lib_sd3").rglob("*.py")
                 if literal.search(path.read_text(encoding="utf-8"))]
    assert offenders == []
    constant = re.compile(r"""^\w+\s*=\s*f?["']SD3 [A-Za-z]""", re.MULTILINE)  # e.g. INFOTEXT = "SD3 family"
    own_names = [str(path.relative_to(ROOT)) for path in (ROOT / "lib_sd3").rglob("*.py")
                 if path.name != "infotext.py" and constant.search(path.read_text(encoding="utf-8"))]
    assert own_names == []
    quoted = re.compile(r"""["'](SD3 [A-Za-z][A-Za-z0-9 ]*?)["']""")
    table = (ROOT / "lib_sd3" / "webui" / "infotext.py").read_text(encoding="utf-8")
    units = {label for label in infotext.LABELS if label.startswith("SD3 ControlNet ")}  # infotext.controlnet()
    assert set(quoted.findall(table)) >= set(infotext.LABELS) - units


def test_slg_text_round_trip():
    text = infotext.format_slg((7, 8, 9), 2.5, 0.01, 0.2)
    assert text == "layers 7,8,9; scale 2.5; steps 0.01-0.2"
    assert options.parse_slg(text) == {"slg_layers": (7, 8, 9), "slg_scale": 2.5, "slg_start": 0.01, "slg_end": 0.2}
    assert options.parse_slg("off (layers [9] are outside ...)") is None
    assert options.parse_slg("layers 7; scale 99; steps 0.1-0.2") is None  # out of the allowed range


@pytest.mark.parametrize("params, expected", [
    # an SD3 infotext with everything on: each accordion field gets its value back
    ({"Steps": "20", "SD3 flow samplers": "True", "SD3 NaN guard": "False", "SD3 MixDQ": "w8a8",
      "SD3 MixDQ hash": "abc", "SD3 SLG": "layers 7,8,9; scale 2.5; steps 0.01-0.2"},
     {"flow_samplers": "on", "nan_guard": "off", "mixdq": "w8a8", "slg": "on", "slg_layers": ["7", "8", "9"],
      "slg_scale": 2.5, "slg_start": 0.01, "slg_end": 0.2}),
    # an SD3 infotext where MixDQ and SLG were off (their entries are absent): they are set off
    ({"SD3 flow samplers": "False", "SD3 NaN guard": "True"},
     {"flow_samplers": "off", "nan_guard": "on", "mixdq": "off", "slg": "off"}),
    # not an SD3 infotext: the accordion is left alone
    ({"Steps": "20", "Sampler": "Euler"}, {}),
    # a custom MixDQ config's name is not a dropdown choice: leave that field
    ({"SD3 flow samplers": "True", "SD3 MixDQ": "mine"}, {"flow_samplers": "on", "slg": "off"}),
])
def test_pasted_values(params, expected):
    pasted = options.pasted_values(params)
    units = {k: pasted.pop(k) for k in list(pasted) if k.startswith("controlnet_")}
    assert pasted == expected
    sd3 = any(key.startswith("SD3 ") for key in params)  # an SD3 infotext without unit entries: units off
    assert units == ({f"controlnet_{n}_model": "None" for n in (1, 2, 3)} if sd3 else {})


def test_pasted_values_are_accepted_by_the_script():
    params = {"SD3 flow samplers": "True", "SD3 NaN guard": "False", "SD3 MixDQ": "w4a8",
              "SD3 SLG": "layers 1; scale 3; steps 0-0.5"}
    ui = options.pasted_values(params)
    values = script_args.parse(tuple(ui.get(name) for name in script_args.NAMES))
    values = {k: v for k, v in values.items() if not k.startswith("controlnet_")}
    assert values == {"flow_samplers": "on", "nan_guard": "off", "mixdq": "w4a8", "slg": "on", "slg_layers": (1,),
                      "slg_scale": 3.0, "slg_start": 0.0, "slg_end": 0.5}


def test_paste_keys_work_as_a1111_uses_them():
    """A1111 calls callable keys, compares keys with paste_field_names and skips handled labels in
    "Override settings" by dict lookup: the key must be all of these at once."""
    components = {name: object() for name in script_args.NAMES}
    fields = options.paste_fields(components)
    pasted_back = [n for n in script_args.NAMES if options.BY_NAME[n].paste is not None]
    assert [c for c, _ in fields] == [components[n] for n in pasted_back]
    params = {"SD3 flow samplers": "False", "SD3 MixDQ": "w8a8"}
    by_arg = dict(zip(pasted_back, (key for _, key in fields), strict=True))
    assert callable(by_arg["flow_samplers"]) and by_arg["flow_samplers"](params) == "off"
    assert by_arg["mixdq"] == "SD3 MixDQ" and by_arg["mixdq"] in options.PASTED
    handled = {key: 1 for _, key in fields}  # infotext_utils.connect_paste's already_handled_fields
    assert "SD3 MixDQ" in handled and "SD3 flow samplers" in handled and "SD3 T5" not in handled
