"""SD3 / SD3.5 LoRA in A1111's built-in Lora extension, on both SD3 states.

A1111's ``networks.load_network`` knows SD1/SDXL names; for SD3 it has nothing (early branch) or a
partial, misspelt diffusers map that crashes on one-dot keys (dev). While an SD3 model is loaded we
load the file ourselves: :func:`lib_sd3.lora.keys.normalise` maps every layout onto the model's
modules, and A1111's own network module types (LoRA, LoHa, LoKr, full, ...) are built on them, so
A1111's weight merging, ``<lora:name:te:unet>`` strengths, caching and hashes stay A1111's. Keys that
do not apply are named in one console line and in ``GET /sd3/status``; a LoRA of which nothing applies
(a file that cannot be read, or one made for another model) is loaded *empty*, so A1111 goes on without
a traceback, and the image's infotext says it was not applied.

The extension's modules (``networks``, ``network``, ``ui_extra_networks_lora``) are imported by A1111
from the extension's folder; they are found in ``sys.modules`` once the app has started.

MixDQ-quantized layers are not Linear, so A1111 cannot merge into them: they get a float low-rank side
path (:mod:`lib_sd3.lora.sidepath`) fed from the same loaded networks.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from lib_sd3 import get_logger
from lib_sd3.lora import detect, keys, sidepath
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.safetensors_file import read_header
from lib_sd3.webui import hooks, infotext
from lib_sd3.webui.capabilities import loaded_model, model_is_sd3

log = get_logger("lora")

FEATURE = "LoRA"
PATCH_LOAD = "lora.load_network"
PATCH_CARD = "lora.card_version"
PATCH_WEIGHTLESS = "lora.weightless_layers"
SD3_VERSION = "SD3"
UNET_PREFIX = "diffusion_model_"  # A1111's network name of ``sd_model.model.diffusion_model.<name>``
TEXT_ENCODERS = (("te1", "clip_l"), ("te2", "clip_g"), ("te3", "t5xxl"))
NO_NETWORK_NAME = "layer has no A1111 network name"
NO_MODULE_TYPE = "no A1111 network module type accepts it"
BUNDLED_EMBEDDING = "bundled embeddings are not loaded for SD3"
STATUS_KEYS = 20  # unmatched keys listed per LoRA in /sd3/status
NOT_APPLIED_ATTR = "sd3_not_applied"  # on a Network we built of which nothing applies: why
NOTHING_MATCHES = "nothing in it fits this model"
MESSAGE_CHARS = 80  # an error quoted in a log line / status is cut to this


def extension_module(name: str) -> Any | None:
    """One of the Lora extension's modules, if A1111 has imported it."""
    return sys.modules.get(name)


def _mmdit(sd_model: Any) -> Any | None:
    return getattr(getattr(sd_model, "model", None), "diffusion_model", None)


def _quantized_originals(mmdit: Any) -> dict[str, Any]:
    """MixDQ's float originals by module name (empty when the MMDiT is not quantized)."""
    from lib_sd3.mixdq import model as mixdq_model

    state = mixdq_model.state(mmdit) if mmdit is not None else None
    return dict(state.originals) if state is not None else {}


class Targets:
    """The loaded SD3 model's LoRA-able layers: layout for the normaliser, and the A1111 module of each."""

    def __init__(self, sd_model: Any) -> None:
        roots: dict[str, Any] = {"unet": _mmdit(sd_model)}
        cond = getattr(sd_model, "cond_stage_model", None)
        for namespace, attr in TEXT_ENCODERS:
            roots[namespace] = getattr(getattr(cond, attr, None), "transformer", None)
        originals = _quantized_originals(roots["unet"])
        layout: dict[str, dict[str, tuple[int, ...]]] = {}
        self.modules: dict[keys.TargetKey, Any] = {}
        for namespace, root in roots.items():
            if root is None:
                continue
            layout[namespace] = keys.layout_of(root)
            named = dict(root.named_modules())
            for name in layout[namespace]:
                module = originals.get(name, named[name]) if namespace == "unet" else named[name]
                if namespace == "unet" and getattr(module, "network_layer_name", None) is None:
                    module.network_layer_name = UNET_PREFIX + name.replace(".", "_")  # A1111's own naming
                self.modules[(namespace, name)] = module
        self.index = keys.KeyIndex(layout)


@contextlib.contextmanager
def _shape_visible(module: Any, shape: tuple[int, ...]) -> Iterator[None]:
    """Let A1111 read the weight shape of a float original MixDQ has spilled to disk (its tensor is empty then).

    A1111's network modules read ``sd_module.weight.shape`` once, when they are built; a zero-stride view
    of one element answers that without allocating, and the empty tensor is put back at once.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() or not shape:
        yield
        return
    saved = weight.data
    weight.data = saved.new_zeros(()).expand(shape)
    try:
        yield
    finally:
        weight.data = saved


class Sd3LoraLoader:
    """Builds A1111 ``network.Network`` objects from SD3 LoRA files; remembers what each load left out."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}

    def load(self, name: str, network_on_disk: Any) -> Any:
        from modules import sd_models, shared

        networks, network = extension_module("networks"), extension_module("network")
        try:
            state_dict = sd_models.read_state_dict(network_on_disk.filename)
        except Exception as error:  # truncated / corrupt: A1111's loader would fail on the same read
            return self._unreadable(network, name, network_on_disk, error)
        targets = Targets(shared.sd_model)
        lora = {k: v for k, v in state_dict.items() if not k.startswith("bundle_emb.")}
        normalised = keys.normalise(lora, targets.index)
        unmatched = dict(normalised.unmatched)
        unmatched.update(dict.fromkeys((k for k in state_dict if k not in lora), BUNDLED_EMBEDDING))

        net = network.Network(name, network_on_disk)
        net.mtime = os.path.getmtime(network_on_disk.filename)
        for (namespace, module_name), weights in normalised.modules.items():
            sd_module = targets.modules[(namespace, module_name)]
            sd_key = getattr(sd_module, "network_layer_name", None)
            label = f"{namespace}:{module_name}"
            if sd_key is None:
                unmatched[label] = NO_NETWORK_NAME
                continue
            with _shape_visible(sd_module, targets.index.layout[namespace][module_name]):
                module = self._module(networks, net, network.NetworkWeights(
                    network_key=label, sd_key=sd_key, w=weights, sd_module=sd_module))
            if module is None:
                unmatched[label] = NO_MODULE_TYPE
                continue
            net.modules[sd_key] = module
        if not net.modules:
            setattr(net, NOT_APPLIED_ATTR, NOTHING_MATCHES)
        self._report(name, network_on_disk.filename, normalised, unmatched, len(net.modules))
        return net

    def _unreadable(self, network: Any, name: str, network_on_disk: Any, error: Exception) -> Any:
        """An empty network: A1111 lists it and goes on; the console, status and infotext say why."""
        reason = f"unreadable file ({_cut(f'{type(error).__name__}: {error}')})"
        net = network.Network(name, network_on_disk)
        net.mtime = os.path.getmtime(network_on_disk.filename)  # a repaired file (new mtime) is read again
        setattr(net, NOT_APPLIED_ATTR, reason)
        self.reports[name] = {"file": os.path.basename(network_on_disk.filename), "formats": [], "modules": 0,
                              "unmatched": 0, "unmatched_keys": [], "applied": False, "error": reason}
        log.error("LoRA %s: %s; not applied", name, reason)
        return net

    @staticmethod
    def _module(networks: Any, net: Any, weights: Any) -> Any | None:
        for module_type in networks.module_types:
            try:
                module = module_type.create_module(net, weights)
            except Exception as error:  # e.g. A1111 refuses a layer type (T5's AutocastLinear on some states)
                log.debug("LoRA module %s: %r", weights.network_key, error)
                return None
            if module is not None:
                return module
        return None

    def _report(self, name: str, filename: str, normalised: keys.NormalisedLora, unmatched: dict[str, str],
                modules: int) -> None:
        self.reports[name] = {
            "file": os.path.basename(filename), "formats": sorted(normalised.formats), "modules": modules,
            "unmatched": len(unmatched), "unmatched_keys": list(unmatched)[:STATUS_KEYS], "applied": modules > 0,
        }
        if not modules:
            log.warning("LoRA %s: %s; not applied (%s)", name, NOTHING_MATCHES,
                        keys.unmatched_summary(unmatched) or "no keys")
        elif unmatched:
            log.warning("LoRA %s: %s", name, keys.unmatched_summary(unmatched))
        else:
            log.info("LoRA %s: %d layers (%s)", name, modules, ", ".join(sorted(normalised.formats)))


def _cut(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS - 3] + "..."


LOADER = Sd3LoraLoader()


def note_not_applied(p: Any, _values: Any = None) -> None:
    """Name in the infotext the LoRAs of this generation that changed nothing (A1111 still lists their hashes)."""
    networks = extension_module("networks")
    skipped = [getattr(net, "mentioned_name", None) or net.name for net in getattr(networks, "loaded_networks", ())
               if getattr(net, NOT_APPLIED_ATTR, None)]
    if skipped:
        p.extra_generation_params[infotext.LORA_NOT_APPLIED] = ", ".join(skipped)
    else:
        p.extra_generation_params.pop(infotext.LORA_NOT_APPLIED, None)


def _wrap_load_network(original: Any) -> Any:
    def load_network(name, network_on_disk):
        if not model_is_sd3():
            return original(name, network_on_disk)
        try:
            return LOADER.load(name, network_on_disk)
        except Exception:  # never worse than A1111: hand the file to its own loader
            log.exception("SD3 LoRA loader failed on %s; A1111's loader takes over", name)
            return original(name, network_on_disk)

    return load_network


def detect_load() -> str | None:
    networks, network = extension_module("networks"), extension_module("network")
    if networks is None or network is None:
        return "A1111's Lora extension (modules networks / network) is not loaded"
    missing = [f"networks.{a}" for a in ("load_network", "module_types", "loaded_networks") if not hasattr(networks, a)]
    missing += [f"network.{a}" for a in ("Network", "NetworkWeights") if not hasattr(network, a)]
    return f"Lora extension lacks {', '.join(missing)}" if missing else None


def load_swaps() -> list[AttributeSwap]:
    return [AttributeSwap(extension_module("networks"), "load_network", _wrap_load_network)]


def _wrap_apply_weights(original: Any) -> Any:
    """Skip layers without a weight (SD3's ``LayerNorm(elementwise_affine=False)``): nothing to merge there.

    The early SD3 branch's ``network_apply_weights`` backs up ``self.weight.to(...)`` unconditionally, so any
    ``<lora:...>`` on SD3 raises ``'NoneType' object has no attribute 'to'`` at the MMDiT's first norm; dev
    returns early for them (``allowed_layer_without_weight``), which is what this does on both states.
    """
    def network_apply_weights(self):
        if hasattr(self, "weight") and self.weight is None:
            return None
        return original(self)

    return network_apply_weights


def detect_weightless() -> str | None:
    if not hasattr(extension_module("networks"), "network_apply_weights"):
        return "Lora extension lacks networks.network_apply_weights"
    return None


def weightless_swaps() -> list[AttributeSwap]:
    return [AttributeSwap(extension_module("networks"), "network_apply_weights", _wrap_apply_weights)]


# --- the Lora tab: SD3 LoRAs are cards of version "SD3" -------------------------------------------

class CardVersions:
    """Which files on disk are SD3 LoRAs, from metadata or the safetensors header (cached by mtime)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, bool]] = {}

    def is_sd3(self, network_on_disk: Any) -> bool:
        filename = network_on_disk.filename
        try:
            mtime = os.path.getmtime(filename)
        except OSError:
            return False
        cached = self._cache.get(filename)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        result = detect.is_sd3_lora(self._keys(filename), getattr(network_on_disk, "metadata", None) or {})
        self._cache[filename] = (mtime, result)
        return result

    @staticmethod
    def _keys(filename: str) -> list[str]:
        if not filename.lower().endswith(".safetensors"):
            return []
        try:
            return list(read_header(filename).tensors)
        except (OSError, ValueError):
            return []


CARDS = CardVersions()


def _show_all() -> bool:
    from modules import shared

    return bool(getattr(shared.opts, "lora_show_all", False)) or not getattr(shared, "sd_model", None)


def _wrap_create_item(original: Any) -> Any:
    def create_item(self, name, index=None, enable_filter=True):
        on_disk = getattr(extension_module("networks"), "available_networks", {}).get(name)
        sd3_model = model_is_sd3()
        sd3_lora = on_disk is not None and CARDS.is_sd3(on_disk)
        if not sd3_lora and not sd3_model:
            return original(self, name, index, enable_filter)
        item = original(self, name, index, False)
        if item is None:
            return None
        user_version = (item.get("user_metadata") or {}).get("sd version")
        if sd3_lora and user_version in (None, "", "Unknown"):
            item["sd_version"] = SD3_VERSION
        if not enable_filter or _show_all():
            return item
        if sd3_model:
            return item if item["sd_version"] in (SD3_VERSION, "Unknown") else None
        return None  # an SD3 LoRA while SD1/SD2/SDXL is loaded

    return create_item


def detect_card() -> str | None:
    page = extension_module("ui_extra_networks_lora")
    if page is None or not hasattr(getattr(page, "ExtraNetworksPageLora", None), "create_item"):
        return "A1111's Lora page (ui_extra_networks_lora.ExtraNetworksPageLora) is not loaded"
    return None


def card_swaps() -> list[AttributeSwap]:
    page = extension_module("ui_extra_networks_lora").ExtraNetworksPageLora
    return [AttributeSwap(page, "create_item", _wrap_create_item)]


# --- MixDQ: quantized layers take LoRA through a float side path ------------------------------------

def _wanted(networks: Any) -> tuple:
    return tuple((id(n), n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in networks.loaded_networks)


def _term(module: Any, layer: Any) -> sidepath.Term:
    """One A1111 network module as a side-path term: low-rank where it is a plain LoRA, else its dense delta."""
    plain = (hasattr(module, "up_model") and getattr(module, "mid_model", None) is None
             and getattr(module, "dora_scale", None) is None and getattr(module, "bias", None) is None)
    if plain:
        up = module.up_model.weight.reshape(module.up_model.weight.shape[0], -1)
        down = module.down_model.weight.reshape(module.down_model.weight.shape[0], -1)
        dyn = module.network.dyn_dim
        if dyn:
            up, down = up[:, :dyn], down[:dyn]
        return sidepath.Term(up.float(), down.float(), module.calc_scale() * module.multiplier())
    updown, ex_bias = module.calc_updown(layer.dequantized_weight(torch.float32))
    if ex_bias is not None:
        log.warning("LoRA %s: a bias delta on quantized layer %s is not applied", module.network.name, module.sd_key)
    return sidepath.Term(updown.reshape(layer.out_features, layer.in_features).float(), None, 1.0)


class QuantizedSidePaths:
    """Side paths on every MixDQ layer of the loaded MMDiT, reading A1111's loaded networks."""

    def __init__(self) -> None:
        self.attached = 0

    def attach_all(self, sd_model: Any) -> None:
        networks = extension_module("networks")
        mmdit = _mmdit(sd_model)
        if networks is None or mmdit is None or not model_is_sd3(sd_model):
            return
        originals = _quantized_originals(mmdit)
        for name, layer in mmdit.named_modules():
            original = originals.get(name)
            if original is None or hasattr(layer, sidepath.HOOK_ATTR):
                continue
            if getattr(original, "network_layer_name", None) is None:
                original.network_layer_name = UNET_PREFIX + name.replace(".", "_")
            layer_name = original.network_layer_name

            def terms(layer: Any, layer_name: str = layer_name) -> list[sidepath.Term]:
                return [_term(net.modules[layer_name], layer)
                        for net in networks.loaded_networks if layer_name in net.modules]

            sidepath.attach(layer, lambda _layer: _wanted(networks), terms)
            self.attached += 1


SIDE_PATHS = QuantizedSidePaths()


def unmerge(root: Any) -> None:
    """Put A1111's LoRA-free weights back into every layer under ``root`` that has a LoRA merged in.

    Before MixDQ quantizes the MMDiT (else the LoRA is baked into int8), and before a checkpoint loads into
    an SD3 model: A1111's Lora extension drops its backups whenever a layer's ``load_state_dict`` runs,
    without restoring them, and the early SD3 branch's ``SD3Cond`` reads CLIP-L/G from ``models/CLIP`` only
    once per model object. A text-encoder LoRA would otherwise stay merged for good after a checkpoint
    switch (and be added twice when used again); dev reloads CLIP on each load, so there this changes nothing.
    """
    networks = extension_module("networks")
    restore = getattr(networks, "network_restore_weights_from_backup", None)
    if restore is None or root is None:
        return
    with torch.no_grad():  # A1111 restores inside forward, under no_grad; its weights are Parameters
        for module in root.modules():
            if getattr(module, "network_current_names", ()):
                restore(module)
                module.network_current_names = ()


def attach_side_paths(_p: Any = None, _values: Any = None) -> None:
    SIDE_PATHS.attach_all(loaded_model())


def status() -> dict[str, Any]:
    return {"loras": dict(LOADER.reports), "quantized_side_paths": SIDE_PATHS.attached}


PATCHES = (
    Patch.from_swaps(PATCH_LOAD, FEATURE, detect_load, load_swaps),
    Patch.from_swaps(PATCH_CARD, FEATURE, detect_card, card_swaps),
    Patch.from_swaps(PATCH_WEIGHTLESS, FEATURE, detect_weightless, weightless_swaps, sd3_only=True),
)
DECLARED = hooks.Feature(
    FEATURE, patches=PATCHES,
    after=("MixDQ",),  # the side paths attach to the layers MixDQ quantized in its process hook
    retarget=(PATCH_LOAD, PATCH_CARD, PATCH_WEIGHTLESS),  # the Lora extension's modules, re-imported on a reload
    process=(attach_side_paths,), before_every_sampling=(attach_side_paths, note_not_applied),
    before_mmdit_rewrite=(unmerge,),
    before_load_weights=(unmerge,),  # a checkpoint loading into an SD3 model gets A1111's LoRA backups back first
    status=status)
