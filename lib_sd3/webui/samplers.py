"""Flow-correct samplers, schedules and the NaN guard in A1111 while an SD3 model is loaded.

Three sd3_only patches (SD1.5 / SDXL keep A1111's original functions, the registry undoes them):

- ``sd_samplers.create_sampler``: each sampler label runs what its row in :data:`ROUTES` says; a label from
  another extension gets :func:`fallback_route`.
- ``sd_schedulers`` functions: every scheduler in the dropdown returns flow levels in (0, 1], with
  Align Your Steps mapped from SD1.5's levels by log-SNR.
- ``SD3Denoiser.forward``: the NaN guard (recompute a non-finite step in bf16 / fp32, else a named error).

The setting ``sd3_flow_samplers`` / ``sd3_nan_guard`` or the script args ``flow_samplers`` /
``nan_guard`` decide per generation; the infotext records what was used.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

from lib_sd3 import get_logger, sampling
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.sampling import flow
from lib_sd3.sampling.nan_guard import NanGuard
from lib_sd3.webui import hooks, infotext, settings
from lib_sd3.webui.capabilities import a1111_option, model_is_sd3
from lib_sd3.webui.generation import GENERATIONS

log = get_logger("samplers")

FEATURE = "flow samplers"
@dataclasses.dataclass(frozen=True)
class EtaField:
    """The A1111 option a sampler's eta comes from, its infotext label and default (A1111's sampler fields)."""

    option: str
    infotext: str
    default: float


DDIM_ETA = EtaField("eta_ddim", "Eta DDIM", 0.0)
"""DDIM's eta comes from the DDIM eta option, as in A1111, not from the ancestral one."""


@dataclasses.dataclass(frozen=True)
class Route:
    """What runs on SD3 for one sampler label.

    ``make(A1111's function, second_order, opts)`` gives the function that runs (A1111's function is None where
    ``own_sampler``: A1111's sampler object cannot drive SD3 at all, so a k-diffusion sampler object runs the flow
    form instead). ``eta``: the option the eta comes from (None: A1111's ancestral eta); ``cfg_scale``: A1111's
    multiplier of the CFG scale, for a sampler that also renoises with the unconditional x0 (DDIM CFG++);
    ``note``: the infotext's ``SD3 flow sampler`` (``{label}`` is the sampler's label). ``aside``: for which call
    arguments A1111's own function runs instead, unchanged, with ``aside_note`` in the infotext.
    """

    note: str
    make: Callable[[Callable[..., Any] | None, bool, Any], Callable[..., Any]]
    own_sampler: bool = False
    eta: EtaField | None = None
    cfg_scale: float | None = None
    aside: Callable[[dict[str, Any]], bool] | None = None
    aside_note: str = ""


def churn_aware(func: Callable[..., Any], second_order: bool = False) -> Callable[..., Any]:
    """Euler / Heun / DPM2: exact as they are, but s_churn > 0 adds VE noise, so churn runs in EDM space."""
    in_edm = sampling.edm_route(func, second_order)

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        return (in_edm if kwargs.get("s_churn", 0) > 0 else func)(*args, **kwargs)

    return run


def unipc_from_opts(opts: Any) -> Callable[..., Any]:
    """A1111's UniPC options (order, variant, lower-order final) applied to the flow UniPC."""
    variant = getattr(opts, "uni_pc_variant", "bh1")

    @functools.wraps(sampling.sample_flow_unipc)
    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("order", int(getattr(opts, "uni_pc_order", 3)))
        kwargs.setdefault("variant", variant if variant in ("bh1", "bh2") else "bh2")  # vary_coeff has no flow form
        kwargs.setdefault("lower_order_final", bool(getattr(opts, "uni_pc_lower_order_final", True)))
        return sampling.sample_flow_unipc(*args, **kwargs)

    return run


def flow_form(sampler: Callable[..., Any], **fields: Any) -> Route:
    """Our flow sampler instead of A1111's function for the label."""
    return Route("{label} -> flow {label}", lambda _func, _second_order, _opts: sampler, **fields)


AS_IS = Route("{label} (flow ODE)", lambda func, _second_order, _opts: func)
"""k-diffusion's own function: the flow ODE has the VE ODE's form, so a deterministic solver is right on flow levels."""
CHURN_IN_EDM = Route("{label} (flow ODE; churn in EDM space)", lambda func, second_order, _opts: churn_aware(
    func, second_order))
IN_EDM = Route("{label} in EDM space", lambda func, second_order, _opts: sampling.edm_route(func, second_order))
"""Noise-injecting: the exact first step from pure noise, then the unchanged sampler in EDM coordinates."""

ROUTES: dict[str, Route] = {
    # A1111's timestep samplers pass integer timesteps as SD3's sigma and read the output as eps; LCM's denoiser
    # class (CFGDenoiserLCM -> LCMCompVisDenoiser) is SD1.5's eps model ("'CFGDenoiserLCM' object has no attribute
    # 'inner_model'" on SD3): their flow forms run in a k-diffusion sampler object instead.
    "DDIM": flow_form(sampling.sample_flow_ddim, own_sampler=True, eta=DDIM_ETA),
    "DDIM CFG++": flow_form(sampling.sample_flow_ddim_cfgpp, own_sampler=True, eta=DDIM_ETA,
                            cfg_scale=1 / 12.5),  # A1111 maps CFG scale 0..12.5 to guidance 0..1
    "PLMS": flow_form(sampling.sample_flow_plms, own_sampler=True),
    "UniPC": Route("{label} -> flow {label}", lambda _func, _second_order, opts: unipc_from_opts(opts),
                   own_sampler=True),
    "LCM": flow_form(sampling.sample_flow_lcm, own_sampler=True),
    "Euler": CHURN_IN_EDM, "Heun": CHURN_IN_EDM, "DPM2": CHURN_IN_EDM,
    "LMS": AS_IS, "DPM++ 2M": AS_IS,
    "Euler a": IN_EDM, "DPM2 a": IN_EDM, "DPM++ 2S a": IN_EDM, "DPM++ SDE": IN_EDM, "DPM++ 2M SDE": IN_EDM,
    "DPM++ 2M SDE Heun": IN_EDM, "DPM++ 3M SDE": IN_EDM, "Restart": IN_EDM,
    # They plan their steps in log sigma from sigma_max, which is infinite in EDM space: their flow forms keep flow
    # levels and take the ancestral noise in flow form (docs/samplers.md)
    "DPM fast": flow_form(sampling.sample_flow_dpm_fast),
    # At eta > 0 (A1111's default) its flow form's ancestral noise is exact on the oracle, yet on the real model it
    # landed further from the ODE end point than A1111's own (11.7 vs 14.8 dB at CFG 4.5): stepped aside for there
    "DPM adaptive": flow_form(sampling.sample_flow_dpm_adaptive, aside=lambda kwargs: ancestral_range(kwargs),
                              aside_note="{label} (A1111's own: ancestral, eta > 0)"),
}
"""Every A1111 sampler label and what it runs on SD3: the one table of sampler routes."""


def ancestral_range(kwargs: dict[str, Any]) -> bool:
    """eta > 0 over a range to integrate (k-diffusion's DPM adaptive refuses eta > 0 on an empty one, which A1111
    gives it at 1 step; the flow form returns the start there)."""
    return kwargs.get("eta", 0) > 0 and float(kwargs["sigma_min"]) < float(kwargs["sigma_max"])


def fallback_route(func: Callable[..., Any]) -> Route:
    """A sampler another extension adds, which no row names: in EDM space if it takes eta or a noise sampler (it
    injects noise), churn in EDM space if it takes s_churn, else as it is. Its signature is all there is to go by."""
    params = inspect.signature(func).parameters
    if "eta" in params or "noise_sampler" in params:
        return IN_EDM
    return CHURN_IN_EDM if "s_churn" in params else AS_IS


MODEL_SCHEDULE = "model's own shifted schedule"
"""Infotext for "Automatic" without a scheduler option: A1111 takes the model's 1000 flow levels."""

@dataclasses.dataclass
class Generation:
    """This generation's choices (from the PROCESS hook) and what happened during sampling."""

    flow: bool
    guard_on: bool
    guard: NanGuard = dataclasses.field(default_factory=sampling.denoiser_guard)
    sampler: str = ""
    sigmas: Any = None
    schedule: str = ""
    calls: CallCount | None = None
    sgm_ignored: bool = False

    def describe(self, sigma: Any) -> str:
        if self.sigmas is not None:
            return sampling.describe_step(self.sampler, self.sigmas, sigma)
        if self.calls is not None:
            return sampling.describe_call(self.sampler, self.calls.calls, self.calls.total, sigma)
        return f"sigma {float(sigma.flatten()[0]):.4g}"


def sampling_state() -> Generation:
    """The running generation's sampling state (``p.sd3.sampling``); outside a generation, the settings'."""
    running = GENERATIONS.running()
    if running is None or running.sampling is None:
        return Generation(bool(settings.get("sd3_flow_samplers")), bool(settings.get("sd3_nan_guard")))
    return running.sampling


def on_process(p: Any, args: dict[str, Any]) -> None:
    """Start a generation: record the flow/guard choice and put it into the infotext."""
    sampling = GENERATIONS.of(p).sampling = Generation(bool(args["flow_samplers"]), bool(args["nan_guard"]))
    if model_is_sd3(getattr(p, "sd_model", None)):
        p.extra_generation_params.update(settings.infotext_params(
            {"sd3_flow_samplers": sampling.flow, "sd3_nan_guard": sampling.guard_on}))


# --- which flow form a sampler gets ------------------------------------------------------------------------


def sgm_noise_multiplied(p: Any) -> bool:
    """Whether A1111's "SGM noise multiplier" option scaled this txt2img's start noise (it says so in the infotext)."""
    from modules import shared

    return bool(getattr(shared.opts, "sgm_noise_multiplier", False)) and p is not None and bool(
        getattr(p, "extra_generation_params", {}).get("SGM noise multiplier"))


class CallCount:
    """The CFG denoiser, counting its calls: DPM fast / adaptive have no schedule, so their step is the model call."""

    def __init__(self, model: Any, total: int | None) -> None:
        self.model, self.total, self.calls = model, total, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _first_sigma(kwargs: dict[str, Any]) -> float:
    return float(kwargs["sigmas"][0]) if "sigmas" in kwargs else float(kwargs["sigma_max"])


def stepping_aside(own: Callable[..., Any], flow_func: Callable[..., Any], route: Route,
                   label: str) -> tuple[Callable[..., Any], Callable[[dict[str, Any]], str]]:
    """A1111's own function where ``route.aside`` says so, else the flow form; and the infotext note for each call."""

    @functools.wraps(own)
    def run(*args: Any, **kwargs: Any) -> Any:
        return (own if route.aside(kwargs) else flow_func)(*args, **kwargs)

    return run, lambda kwargs: (route.aside_note if route.aside(kwargs) else route.note).format(label=label)


def in_generation(sampler: Any, func: Callable[..., Any], label: str,
                  note: str | Callable[[dict[str, Any]], str]) -> Callable[..., Any]:
    """Run ``func`` for ``sampler`` with SD3's bookkeeping around it.

    - img2img on A1111s that noise with x + sigma * noise (no ``add_noise_to_latent``, the early SD3
      branch): subtract sigma * x so the start is the flow latent (1 - s) x + s noise;
    - the step context for the NaN guard's error, and the infotext afterwards.
    Fresh noise needs nothing here: our samplers, like k-diffusion's, draw it from
    ``k_diffusion.sampling.torch``, which A1111 points at its per-image seeded generator.
    """
    from modules import shared

    @functools.wraps(func)
    def run(model: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        generation = sampling_state()
        flow_run = generation.flow and ("sigmas" in kwargs or "sigma_max" in kwargs)
        init = getattr(getattr(sampler, "model_wrap_cfg", None), "init_latent", None)
        p = getattr(sampler, "p", None)
        if flow_run and init is not None and not hasattr(shared.sd_model, "add_noise_to_latent"):
            x = x - _first_sigma(kwargs) * init
        generation.sgm_ignored = flow_run and init is None and sgm_noise_multiplied(p)
        if generation.sgm_ignored:  # A1111 scaled pure noise by sqrt(1 + s^2), SDXL's VP convention; flow's is s
            x = x * (_first_sigma(kwargs) / math.sqrt(1 + _first_sigma(kwargs) ** 2))
        generation.sampler = label
        generation.sigmas = kwargs.get("sigmas")
        generation.calls = CallCount(model, kwargs.get("n")) if "sigmas" not in kwargs else None
        try:
            return func(generation.calls or model, x, *args, **kwargs)
        finally:
            if p is not None:
                write_infotext(p, generation, note(kwargs) if callable(note) else note)
            generation.sigmas = generation.calls = None

    return run


def write_infotext(p: Any, generation: Generation, note: str) -> None:
    params = p.extra_generation_params
    if generation.flow:
        params[infotext.FLOW_SAMPLER] = note
        params[infotext.FLOW_SCHEDULE] = generation.schedule or MODEL_SCHEDULE
    if generation.guard.recoveries:
        params[infotext.NAN_RECOVERY] = generation.guard.summary()
    if generation.sgm_ignored:
        params[infotext.SGM_NOISE] = "ignored (flow model: pure noise has std 1)"


# --- patches --------------------------------------------------------------------------------------------


def make_create_sampler(original: Callable[..., Any]) -> Callable[..., Any]:
    def create_sampler(name: str, model: Any) -> Any:
        if not model_is_sd3(model):
            return original(name, model)
        from modules import sd_samplers, sd_samplers_kdiffusion, shared

        config = sd_samplers.find_sampler_config(name)
        label = getattr(config, "name", name)
        route = ROUTES.get(label) if sampling_state().flow else None
        if route is not None and route.own_sampler:
            sampler = sd_samplers_kdiffusion.KDiffusionSampler(route.make(None, False, shared.opts), model)
            sampler.config = config
            if route.eta is not None:
                sampler.eta_option_field, sampler.eta_infotext_field, sampler.eta_default = (
                    route.eta.option, route.eta.infotext, route.eta.default)
            if route.cfg_scale is not None:
                sampler.model_wrap_cfg.cond_scale_miltiplier = route.cfg_scale
                sampler.model_wrap_cfg.need_last_noise_uncond = True
            note = route.note.format(label=label)
        else:
            sampler = original(name, model)
            func = getattr(sampler, "func", None)
            if func is None:
                return sampler
            note = label
            if sampling_state().flow:
                route = route or fallback_route(func)
                own, func = func, route.make(func, bool(getattr(config, "options", {}).get("second_order")), shared.opts)
                note = route.note.format(label=label)
                if route.aside is not None:
                    func, note = stepping_aside(own, func, route, label)
            sampler.func = func
        sampler.func = in_generation(sampler, sampler.func, label, note)
        return sampler

    return create_sampler


def _shift(inner_model: Any) -> float:
    """The loaded model's time shift (3 for SD3 Medium), read from its ModelSamplingDiscreteFlow."""
    from modules import shared

    for owner in (getattr(inner_model, "inner_model", None), shared.sd_model):
        shift = getattr(owner, "shift", None) or getattr(getattr(getattr(owner, "model", None), "model_sampling", None),
                                                        "shift", None)
        if shift:
            return float(shift)
    return flow.SD3_SHIFT


def make_schedule(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def function(*args: Any, **kwargs: Any) -> Any:
            generation = sampling_state()
            if not generation.flow:
                return original(*args, **kwargs)
            bound = dict(zip(("n", "sigma_min", "sigma_max"), args, strict=False)) | kwargs
            sigmas = flow.schedule(name, int(bound["n"]), float(bound["sigma_min"]), float(bound["sigma_max"]),
                                   shift=_shift(bound.get("inner_model")), rho=bound.get("rho"),
                                   beta_alpha=float(a1111_option("beta_dist_alpha", 0.6)),
                                   beta_beta=float(a1111_option("beta_dist_beta", 0.6)))
            generation.schedule = flow.describe_schedule(name)
            return sigmas.to(bound.get("device", "cpu"))

        return function

    return make


def make_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: Any, input: Any, sigma: Any, **kwargs: Any) -> Any:
        generation = sampling_state()
        if not generation.guard_on:
            return original(self, input, sigma, **kwargs)
        return generation.guard(original, self, input, sigma, what="SD3 denoiser",
                                where=lambda: generation.describe(sigma), **kwargs)

    return forward


def _missing(module_name: str, *attrs: str) -> str | None:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        return f"{module_name} not importable ({error!r})"
    for attr in attrs:
        if not hasattr(module, attr):
            return f"{module_name}.{attr} not found"
        module = getattr(module, attr)
    return None


def _detect_create_sampler() -> str | None:
    return (_missing("modules.sd_samplers", "create_sampler") or _missing("modules.sd_samplers", "find_sampler_config")
            or _missing("modules.sd_samplers_kdiffusion", "KDiffusionSampler"))


def _scheduler_swaps() -> list[AttributeSwap]:
    from modules import sd_schedulers

    return [AttributeSwap(s, "function", make_schedule(s.name)) for s in sd_schedulers.schedulers
            if getattr(s, "function", None) is not None and s.name in flow.SCHEDULE_NAMES]


def _create_sampler_swaps() -> list[AttributeSwap]:
    from modules import sd_samplers

    return [AttributeSwap(sd_samplers, "create_sampler", make_create_sampler)]


def _forward_swaps() -> list[AttributeSwap]:
    from modules.models.sd3 import sd3_model

    return [AttributeSwap(sd3_model.SD3Denoiser, "forward", make_forward)]


PATCHES = (
    Patch.from_swaps("samplers.create_sampler", FEATURE, _detect_create_sampler, _create_sampler_swaps, sd3_only=True),
    Patch.from_swaps("samplers.schedulers", FEATURE, lambda: _missing("modules.sd_schedulers", "schedulers"),
                     _scheduler_swaps, sd3_only=True),
    Patch.from_swaps("samplers.nan_guard", "NaN guard", lambda: _missing("modules.models.sd3.sd3_model", "SD3Denoiser"),
                     _forward_swaps, sd3_only=True),
)

DECLARED = hooks.Feature(FEATURE, patches=PATCHES, process=(on_process,), status=lambda: {
    "routes": {label: route.note.format(label=label) + (f"; {route.aside_note.format(label=label)}" if route.aside
                                                        else "") for label, route in ROUTES.items()},
    "schedules": list(flow.SCHEDULE_NAMES),
    "ays": flow.AYS_DESCRIPTION,
})
