"""Test-only A1111 extension the real-WebUI suite installs next to sd-webui-sd3 (never shipped to users).

It records what the API cannot show: the final latent of every generation (finite? its std?) as an
infotext entry ``SD3 test latent`` (from the ``post_sample`` hook, before the VAE), and the latent itself
as ``SD3 test latent values`` (small images only), so the sampler cases judge the sampler's output rather
than a random VAE's picture of it.

It also runs inside A1111 when scripts load, before the model loads, and does two things, both driven by
``SD3_TEST_T5`` (JSON written by tests/webui/conftest.py):

- shrinks A1111's ``T5_CONFIG`` in place (``modules.models.sd3.sd3_cond`` on dev, ``sd3_model`` on
  34b4443c) to the reduced T5 the test's mirror serves: T5-XXL at full size needs ~19 GB in fp32;
- gives the extension's T5 feature (``lib_sd3.webui.t5.T5.configure``) that reduced file's size and
  sha256, so the downloader verifies the bytes the mirror really serves instead of rejecting them
  as not the real T5-XXL;
- plans T5's memory for that reduced T5 (``lib_sd3.t5.RESIDENT_BYTES``, headroom kept): the extension
  plans for T5-XXL's 9.8 GB, and whether a T5 case ran then depended on the test machine having 12 GB
  free, not on the extension.
"""

import dataclasses
import importlib
import json
import os

from modules import scripts

SETTINGS = json.loads(os.environ.get("SD3_TEST_T5", "{}"))


def _shrink_t5_config() -> str:
    config = SETTINGS.get("config")
    if not config:
        return "no reduced T5 config given"
    for name in ("modules.models.sd3.sd3_cond", "modules.models.sd3.sd3_model"):
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        if isinstance(getattr(module, "T5_CONFIG", None), dict):
            module.T5_CONFIG.update(config)
            return f"{name}.T5_CONFIG reduced to {config}"
    return "no T5_CONFIG found"


def _use_reduced_t5_source() -> str:
    """Give the extension's T5 feature the reduced file's size and sha256 through its one public
    seam, ``T5.configure`` (the feature is built at start-up; nothing else in lib_sd3 is touched)."""

    if not SETTINGS.get("sha256"):
        return "no reduced T5 digest given"
    from lib_sd3.webui.t5 import T5

    filename = SETTINGS.get("filename", "t5xxl_fp16.safetensors")
    rows = tuple(dataclasses.replace(row, size=SETTINGS["size"], sha256=SETTINGS["sha256"], confirmed=True)
                 for row in T5.setup.sources[filename])
    T5.configure(dataclasses.replace(T5.setup, sources={**T5.setup.sources, filename: rows}))
    return f"{len(rows)} T5 source(s) point at the reduced test file"


def _plan_memory_for_reduced_t5() -> str:
    config = SETTINGS.get("config")
    if not config:
        return "no reduced T5 config given"
    from lib_sd3 import t5

    d, ff = config["d_model"], config["d_ff"]
    linear, embedding = config["num_layers"] * (4 * d * d + 3 * d * ff), config["vocab_size"] * d
    t5.RESIDENT_BYTES.update(fp16=linear * 2 + embedding * 4, fp8=linear + embedding * 4)  # as t5.py counts XXL
    return f"T5 memory planned for the reduced T5 ({t5.RESIDENT_BYTES['fp16'] / 1e9:.2f} GB in fp16)"


def _safely(step) -> str:
    try:
        return step()
    except Exception as error:  # the support script must load whatever the extension's tables look like
        return f"{step.__name__} failed: {error!r}"


print(f"[sd3-test-support] {_safely(_shrink_t5_config)}; {_safely(_use_reduced_t5_source)}; "
      f"{_safely(_plan_memory_for_reduced_t5)}")


LATENT_KEY = "SD3 test latent"
VALUES_KEY = "SD3 test latent values"
"""The final latent itself (base64 float32, first image, at most MAX_VALUES numbers) for end-point comparisons."""
MAX_VALUES = 4096


class SD3TestSupport(scripts.Script):
    def title(self):
        return "SD3 test support"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def post_sample(self, p, ps, *args):
        import torch

        samples = ps.samples  # a hires fix with a non-latent upscaler hands over decoded images (a list)
        samples = (torch.stack(list(samples)) if isinstance(samples, list) else samples).float()
        finite = bool(torch.isfinite(samples).all())
        std = float(samples[torch.isfinite(samples)].std()) if finite or torch.isfinite(samples).any() else float("nan")
        p.extra_generation_params[LATENT_KEY] = f"finite {int(finite)} std {std:.6g}"
        if samples[0].numel() <= MAX_VALUES:
            import base64

            p.extra_generation_params[VALUES_KEY] = base64.b64encode(samples[0].cpu().numpy().tobytes()).decode()


def _lora_cards() -> list[dict]:
    """What the Lora tab lists now (``list_items`` applies A1111's "show only compatible" filter)."""
    from modules import ui_extra_networks

    page = next((p for p in ui_extra_networks.extra_pages if p.name == "lora"), None)
    if page is None:
        return []
    page.refresh()
    return [{"name": item["name"], "sd_version": item.get("sd_version")} for item in page.list_items()]


def _loaded_model():
    """The loaded model without loading one (``shared.sd_model`` would load it)."""
    from modules import sd_models

    return sd_models.model_data.sd_model


MODEL_LOADS = {"loaded_before_this_script": _safely(lambda: str(_loaded_model() is not None)), "seen": []}
"""What an extension loaded after sd-webui-sd3 sees of the model loads: A1111 loads the model after
every script is imported, so this script's own ``on_model_loaded`` must see the first load."""


def _saw_model_load(sd_model):
    MODEL_LOADS["seen"].append(getattr(getattr(sd_model, "sd_checkpoint_info", None), "name", None))


def _add_routes(_demo, app):
    app.add_api_route("/sd3-test/lora-cards", _lora_cards, methods=["GET"])
    app.add_api_route("/sd3-test/model-loads", lambda: MODEL_LOADS, methods=["GET"])


from modules import script_callbacks  # noqa: E402

script_callbacks.on_app_started(_add_routes)
script_callbacks.on_model_loaded(_saw_model_load)
