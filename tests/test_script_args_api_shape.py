"""``alwayson_scripts`` as real A1111 delivers it: the request's args written over the UI defaults.

A1111's ``Api.init_script_args`` starts from every script's UI default values and overwrites only the
first ``len(request args)`` slots, so a one-dict request reaches the script as
``(dict, default, default, ...)`` -- seen in a real A1111 dev run of tests/webui.
"""

from lib_sd3.webui import script_args


def a1111_api_args(request_args: list) -> tuple:
    """What A1111 passes to the script: UI defaults, the first slots replaced by the request's args."""
    defaults = [arg.default for arg in script_args.ARGS]
    defaults[: len(request_args)] = request_args
    return tuple(defaults)


def test_dict_followed_by_ui_defaults_is_the_dict():
    values = script_args.parse(a1111_api_args([{"flow_samplers": "on", "mixdq": "w8a8"}]))
    assert values["flow_samplers"] == "on"
    assert values["mixdq"] == "w8a8"
    assert values["nan_guard"] == script_args.USE_SETTING


def test_unknown_name_in_the_dict_is_still_an_error():
    try:
        script_args.parse(a1111_api_args([{"no_such_arg": "on"}]))
    except script_args.ScriptArgError as error:
        assert "no_such_arg" in str(error)
    else:
        raise AssertionError("an unknown SD3 arg must be rejected")
