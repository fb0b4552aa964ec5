"""The adapter core against stand-in A1111 modules: state detection, settings, status route."""

from a1111.models import Model

from lib_sd3.webui import capabilities, routes, settings


def test_state_detection_by_features(sd3_modules):
    assert capabilities.a1111_state() == capabilities.STATE_NONE
    sd3_modules("early")
    assert capabilities.a1111_state() == capabilities.STATE_EARLY
    sd3_modules("dev")
    assert capabilities.a1111_state() == capabilities.STATE_DEV


def test_model_is_sd3(fake_webui):
    assert not capabilities.model_is_sd3()
    fake_webui.shared.sd_model = Model("SD3")
    assert capabilities.model_is_sd3()


def test_settings_section_and_infotext(fake_webui):
    settings.register(fake_webui.shared)
    labels = fake_webui.shared.opts.data_labels
    assert set(labels) == {s.key for s in settings.SETTINGS}
    assert all(info.section == settings.SECTION for info in labels.values())
    assert labels["sd3_mixdq"].infotext == "SD3 MixDQ"
    fake_webui.shared.opts.data["sd3_mixdq"] = "w8a8"
    assert settings.get("sd3_mixdq") == "w8a8"
    assert settings.infotext_params({"sd3_mixdq": "w8a8", "sd3_fetch": True}) == {"SD3 MixDQ": "w8a8"}


def test_status_route_is_json(fake_webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    routes.mount(app)
    body = TestClient(app).get("/sd3/status").json()
    assert body["capabilities"]["a1111_state"] == capabilities.STATE_NONE
    assert body["capabilities"]["model_is_sd3"] is False
    assert isinstance(body["patches"], dict) and isinstance(body["features"], dict)


def test_every_setting_gets_a_component_in_a1111(fake_webui):
    """A1111's settings page (ui_settings.create_setting_component, both states) builds a component from the
    option's own, else from the default's type -- str, int or bool; anything else stops the WebUI's start-up."""
    settings.register(fake_webui.shared)
    for key, info in fake_webui.shared.opts.data_labels.items():
        assert info.component is not None or type(info.default) in (str, int, bool), key
