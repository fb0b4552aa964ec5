"""SD3.5 in A1111: build the right MMDiT for each family, and never load a checkpoint partly.

Four patches, all global (they act before an SD3 model exists), all feature-detected:

- ``sd3_model.BaseModel`` (the name ``SD3Inferencer`` builds its MMDiT wrapper with, both states):
  a subclass that detects the family from the state dict and builds :class:`lib_sd3.models.mmdit.MMDiT`
  for every SD3 family: SD3.5 needs it (qk-norm, MMDiT-X); SD3 Medium gets it for speed (A1111's
  MMDiT keeps the image stream in a transposed layout), with A1111's numbers bit for bit.
- ``sd_models.load_model_weights``: first ``hooks.BEFORE_LOAD_WEIGHTS`` on an SD3 model (the LoRA
  feature puts merged layers back there); then, before A1111's ``load_state_dict(strict=False)``, every
  ``model.diffusion_model.*`` key must match a parameter (and the reverse), else one error naming
  the family and the first keys. A1111 reloads a checkpoint of the same config into the *same*
  model object, so when the family's architecture differs from the one built (SD3 <-> SD3.5),
  the MMDiT is rebuilt first. Sets ``sd_model.sd3_family``.
- ``sd_models.reload_model_weights``: the same checks from the safetensors header alone, before
  A1111 unloads anything, so a truncated or foreign SD3-shaped file leaves the previous model as it was.
- ``options.Options.set`` for ``sd_model_checkpoint`` (the settings UI, the quicksettings dropdown and
  ``POST /sdapi/v1/options``): the same header check before the option changes. A1111 runs the model
  load in the option's ``onchange``, and ``Options.set`` prints any exception from there as a full
  traceback and answers the API with HTTP 200 anyway; refusing before that gives one line, the API
  client an HTTP 422 (A1111's API prints nothing more for an ``HTTPException``), and the UI's dropdown
  the old value back (``set`` returning False is A1111's own "not changed").

Shift: Stability uses 3 for every family, as A1111's ``ModelSamplingDiscreteFlow`` already does;
the sampling object is kept as A1111 made it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lib_sd3 import get_logger
from lib_sd3.models.families import (
    SD35_LARGE,
    CheckpointError,
    Family,
    MMDiTConfig,
    detect,
    read_checkpoint_header,
    shapes_of,
)
from lib_sd3.models.mmdit import MMDiT
from lib_sd3.models.mmdit_load import check_complete, expected_shapes
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.webui import hooks, infotext
from lib_sd3.webui.capabilities import a1111_module, loaded_model

log = get_logger("models")

FEATURE = "SD3.5 models"
SD3_MODEL = "modules.models.sd3.sd3_model"
SD3_IMPLS = "modules.models.sd3.sd3_impls"
A1111_MMDIT = "modules.models.sd3.mmdit"
SD_MODELS = "modules.sd_models"
OPTIONS = "modules.options"
CHECKPOINT_OPTION = "sd_model_checkpoint"
FAMILY_ATTR = "sd3_family"  # on the loaded sd_model: the Family object ("surface" reads it)
BUILT_ATTR = "sd3_built"  # on the BaseModel: the MMDiTConfig its diffusion_model was built for


def _a1111_qkv_linear() -> type:
    """A1111's ``QkvLinear``: its LoRA code type-checks it, so our blocks use the same class."""
    module = a1111_module(A1111_MMDIT)
    return getattr(module, "QkvLinear", None) or torch.nn.Linear


def family_of_state_dict(state_dict: dict, checkpoint_file: str | None = None) -> Family | None:
    """The family of an in-memory state dict; Turbo from the file's safetensors metadata or name."""
    family = detect(shapes_of(state_dict), {}, checkpoint_file)
    if family is None or family.name != SD35_LARGE:  # only Large has a Turbo, and only metadata can say so
        return family
    metadata: dict[str, str] = {}
    if checkpoint_file and str(checkpoint_file).endswith(".safetensors"):
        try:
            metadata = read_checkpoint_header(checkpoint_file).metadata
        except (OSError, CheckpointError):
            metadata = {}
    return detect(shapes_of(state_dict), metadata, checkpoint_file)


# --- construction -------------------------------------------------------------------------------

def _family_base_model(original: type) -> type:
    """A subclass of A1111's ``BaseModel`` that builds our MMDiT for every SD3 family it recognises."""

    class SD3FamilyBaseModel(original):
        def __init__(self, shift=1.0, device=None, dtype=torch.float32, state_dict=None, prefix="", **kwargs):
            family = detect(shapes_of(state_dict)) if state_dict is not None else None
            if family is None:
                super().__init__(shift=shift, device=device, dtype=dtype, state_dict=state_dict, prefix=prefix,
                                 **kwargs)
                return
            # A1111's __init__ would build (and, outside its meta-init, allocate) its own MMDiT first
            torch.nn.Module.__init__(self)
            self.diffusion_model = MMDiT(family.config, qkv_linear=_a1111_qkv_linear(), dtype=dtype, device=device)
            self.model_sampling = a1111_module(SD3_IMPLS).ModelSamplingDiscreteFlow(shift=shift)
            self.depth = family.config.depth
            self.sd3_built = family.config
            log.info("%s: building sd-webui-sd3's MMDiT (qk-norm %s, MMDiT-X layers %s)", family.label,
                     family.config.qk_norm, list(family.config.x_block_self_attn_layers) or "none")

    # same name as A1111's class, so anything that prints or compares the class name sees "BaseModel"
    SD3FamilyBaseModel.__qualname__ = SD3FamilyBaseModel.__name__ = original.__name__
    return SD3FamilyBaseModel


def _built_config(holder: Any) -> MMDiTConfig | None:
    """The config our MMDiT in a loaded BaseModel was built for; None if A1111 built it (before our patch)."""
    return getattr(holder, BUILT_ATTR, None)


def _rebuild(holder: Any, family: Family) -> None:
    """Give ``holder`` a fresh MMDiT for ``family`` (uninitialised: the load fills every parameter)."""
    old = holder.diffusion_model
    sample = next(old.parameters())
    with torch.device("meta"):
        fresh = MMDiT(family.config, qkv_linear=_a1111_qkv_linear(), dtype=sample.dtype)
    mmdit = fresh.to_empty(device=sample.device)
    mmdit.dtype = getattr(old, "dtype", sample.dtype)
    holder.diffusion_model = mmdit
    holder.depth = family.config.depth
    setattr(holder, BUILT_ATTR, family.config)
    log.info("rebuilt the MMDiT for %s (the loaded model was another SD3 architecture)", family.label)


# --- loading ------------------------------------------------------------------------------------

def _checked_load(original: Any) -> Any:
    def load_model_weights(model, checkpoint_info, state_dict, timer):
        if getattr(model, "is_sd3", False):
            for hook in hooks.BEFORE_LOAD_WEIGHTS:
                hook(model)
        holder = getattr(model, "model", None)
        if getattr(holder, "diffusion_model", None) is None:  # not a model with an MMDiT/UNet wrapper
            return original(model, checkpoint_info, state_dict, timer)
        if state_dict is None:  # A1111's "restore the previous checkpoint" call: read it as A1111 would
            state_dict = a1111_module(SD_MODELS).get_checkpoint_state_dict(checkpoint_info, timer)
        filename = getattr(checkpoint_info, "filename", None)
        family = family_of_state_dict(state_dict, filename)
        if family is None:
            return original(model, checkpoint_info, state_dict, timer)
        where = Path(filename).name if filename else "checkpoint"
        checkpoint = shapes_of(state_dict)
        check_complete(family, expected_shapes(family.config), checkpoint, where)  # before anything changes
        if _built_config(holder) != family.config:
            _rebuild(holder, family)
        # the module itself, too: whoever built it, every key must land in it
        check_complete(family, shapes_of(holder.diffusion_model.state_dict()), checkpoint, where)
        result = original(model, checkpoint_info, state_dict, timer)
        unfilled = [name for name, p in holder.diffusion_model.named_parameters() if p.is_meta]
        if unfilled:
            raise CheckpointError(f"{where}: {family.label}: {len(unfilled)} MMDiT parameters were never filled "
                                  f"(first: {', '.join(unfilled[:3])})")
        setattr(model, FAMILY_ATTR, family)
        return result

    return load_model_weights


def precheck_file(filename: str | None) -> Family | None:
    """Everything that can be said about an SD3 checkpoint from its header, before A1111 unloads a model.

    Raises :class:`CheckpointError` for a truncated or non-safetensors ``.safetensors`` file, an
    unknown SD3 layout, or keys that do not fit the family's MMDiT. Other formats are left to A1111.
    """
    if not filename or not str(filename).endswith(".safetensors"):
        return None
    header = read_checkpoint_header(filename)
    family = detect(header.shapes, header.metadata, str(filename))
    if family is not None:
        check_complete(family, expected_shapes(family.config), header.shapes, Path(filename).name)
    return family


def _refusal(filename: str | None) -> CheckpointError | None:
    """Why ``filename`` must not be loaded (said once in the console), or None."""
    try:
        precheck_file(filename)
    except CheckpointError as error:
        log.error("not loading %s: %s; the previous model stays loaded", filename, error)
        return error
    return None


def _checked_reload(original: Any) -> Any:
    def reload_model_weights(sd_model=None, info=None, forced_reload=False):
        checkpoint_info = info
        if checkpoint_info is None:
            try:
                checkpoint_info = a1111_module(SD_MODELS).select_checkpoint()
            except Exception:
                checkpoint_info = None
        refused = _refusal(getattr(checkpoint_info, "filename", None))
        if refused is not None:
            raise refused
        return original(sd_model=sd_model, info=info, forced_reload=forced_reload)

    return reload_model_weights


def _checked_option(original: Any) -> Any:
    def set(self, key, value, is_api=False, run_callbacks=True):  # noqa: A001 -- A1111's method name
        if key == CHECKPOINT_OPTION and run_callbacks and isinstance(value, str) and value != self.data.get(key):
            info = a1111_module(SD_MODELS).checkpoint_aliases.get(value)  # None: A1111 answers itself
            refused = _refusal(info.filename) if info is not None else None
            if refused is not None:
                if is_api:
                    from fastapi import HTTPException

                    raise HTTPException(status_code=422, detail=f"{Path(info.filename).name}: {refused}")
                return False
        return original(self, key, value, is_api=is_api, run_callbacks=run_callbacks)

    return set


# --- detection, registration --------------------------------------------------------------------

def _detect_construction() -> str | None:
    sd3_model, sd3_impls = a1111_module(SD3_MODEL), a1111_module(SD3_IMPLS)
    if sd3_model is None or not isinstance(getattr(sd3_model, "BaseModel", None), type):
        return f"{SD3_MODEL}.BaseModel not found"
    if sd3_impls is None or not hasattr(sd3_impls, "ModelSamplingDiscreteFlow"):
        return f"{SD3_IMPLS}.ModelSamplingDiscreteFlow not found"
    return None


def _detect_loading() -> str | None:
    sd_models = a1111_module(SD_MODELS)
    missing = [name for name in ("load_model_weights", "reload_model_weights", "get_checkpoint_state_dict",
                                 "select_checkpoint") if not hasattr(sd_models, name)]
    return f"{SD_MODELS} lacks {', '.join(missing)}" if missing else None


def _detect_option() -> str | None:
    if not callable(getattr(getattr(a1111_module(OPTIONS), "Options", None), "set", None)):
        return f"{OPTIONS}.Options.set not found"
    if not isinstance(getattr(a1111_module(SD_MODELS), "checkpoint_aliases", None), dict):
        return f"{SD_MODELS}.checkpoint_aliases not found"
    return None


def family_status() -> dict[str, Any]:
    """What ``GET /sd3/status`` reports: the loaded model's family and which MMDiT runs it."""
    model = loaded_model()
    family = getattr(model, FAMILY_ATTR, None)
    if family is None:
        return {"family": None, "label": None}
    mmdit = getattr(getattr(model, "model", None), "diffusion_model", None)
    return {"family": family.name, "label": family.label, "turbo_from": family.turbo_from or None,
            "mmdit": "sd-webui-sd3" if type(mmdit) is MMDiT else "A1111",
            "depth": family.config.depth, "qk_norm": family.config.qk_norm,
            "mmdit_x_layers": list(family.config.x_block_self_attn_layers)}


def adopt(sd_model: Any) -> None:
    """Name the family of an SD3 model loaded before the extension (installed, then "Reload UI"):
    the loaders above never saw it, so read the family from the MMDiT A1111 built."""
    mmdit = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if mmdit is None or not getattr(sd_model, "is_sd3", False) or getattr(sd_model, FAMILY_ATTR, None) is not None:
        return
    filename = getattr(getattr(sd_model, "sd_checkpoint_info", None), "filename", None)
    try:
        family = family_of_state_dict(mmdit.state_dict(), filename)
    except CheckpointError as error:
        log.warning("the loaded SD3 model fits no known family: %s", error)
        return
    if family is not None:
        setattr(sd_model, FAMILY_ATTR, family)


def process(p: Any, _values: dict[str, Any]) -> None:
    family = getattr(getattr(p, "sd_model", None) or loaded_model(), FAMILY_ATTR, None)
    if family is not None:
        p.extra_generation_params[infotext.FAMILY] = family.label


CONSTRUCTION = Patch.from_swaps(
    "models.BaseModel", FEATURE, _detect_construction,
    lambda: [AttributeSwap(a1111_module(SD3_MODEL), "BaseModel", _family_base_model)])
LOADING = Patch.from_swaps(
    "models.load_model_weights", FEATURE, _detect_loading,
    lambda: [AttributeSwap(a1111_module(SD_MODELS), "load_model_weights", _checked_load),
             AttributeSwap(a1111_module(SD_MODELS), "reload_model_weights", _checked_reload)])
CHECKPOINT_OPTION_CHECK = Patch.from_swaps(
    "models.checkpoint_option", FEATURE, _detect_option,
    lambda: [AttributeSwap(a1111_module(OPTIONS).Options, "set", _checked_option)])

DECLARED = hooks.Feature(FEATURE, patches=(CONSTRUCTION, LOADING, CHECKPOINT_OPTION_CHECK), model_loaded=(adopt,),
                         process=(process,), status=family_status)
