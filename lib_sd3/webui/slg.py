"""Skip-layer guidance (SLG) in A1111's sampling, for SD3-family models.

The hook: every sampler, k-diffusion or A1111's timestep samplers (which the extension reroutes to
k-diffusion on SD3, see :mod:`lib_sd3.webui.samplers`), CFG++ included, combines its branches in
``CFGDenoiser.combine_denoised(x_out, conds_list, uncond, cond_scale)``. That method sees the cond and
uncond outputs but not the inputs, so ``script_callbacks.on_cfg_denoiser`` (called by
``CFGDenoiser.forward`` just before the model call, with the batch it will run) keeps the params of
the call in progress; the patched ``combine_denoised`` adds, inside the step window, one more pass of
the cond rows with the listed joint blocks skipped (:func:`lib_sd3.sampling.slg.skip_blocks`):

    denoised += slg * (cond - cond_skipped)        (per AND-prompt, times its weight)

which with A1111's own ``uncond + cfg (cond - uncond)`` is Stability's ``SkipLayerCFGDenoiser``. The
extra pass goes through ``self.inner_model`` -- the same SD3 denoiser (and so the same NaN guard)
as the regular passes. The window is counted as the reference counts it: ``step`` is the number of
denoiser calls so far and ``steps`` the sampling steps (:func:`lib_sd3.sampling.slg.in_window`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from lib_sd3 import get_logger
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.sampling.slg import checked_layers, in_window, joint_blocks_of, skip_blocks
from lib_sd3.webui import hooks, infotext
from lib_sd3.webui.capabilities import a1111_module, loaded_model, model_is_sd3
from lib_sd3.webui.generation import GENERATIONS

log = get_logger("slg")

FEATURE = "skip-layer guidance"


@dataclasses.dataclass
class SlgRun:
    """One generation's SLG choice, and what happened."""

    layers: tuple[int, ...]
    scale: float
    start: float
    end: float
    model: Any  # what holds the MMDiT: A1111's SD3 ``BaseModel`` (``.diffusion_model``)
    pending: Any = None  # the CFGDenoiserParams of the denoiser call in progress
    guided_steps: list[int] = dataclasses.field(default_factory=list)


def start(p: Any, args: dict[str, Any]) -> None:
    """``process``: this generation's SLG run (``p.sd3.slg``), or None while SLG is off for it."""
    generation = GENERATIONS.of(p)
    generation.slg = None
    sd_model = getattr(p, "sd_model", None) or loaded_model()
    if not args.get("slg") or not model_is_sd3(sd_model) or args["slg_scale"] == 0:
        return
    model = getattr(sd_model, "model", None)
    try:
        layers = checked_layers(args["slg_layers"], len(joint_blocks_of(model)))
    except (TypeError, ValueError) as error:
        log.warning("skip-layer guidance off for this generation: %s", error)
        p.extra_generation_params[infotext.SLG] = f"off ({error})"
        return
    generation.slg = SlgRun(layers, float(args["slg_scale"]), float(args["slg_start"]), float(args["slg_end"]), model)
    p.extra_generation_params[infotext.SLG] = infotext.format_slg(layers, generation.slg.scale, generation.slg.start,
                                                                  generation.slg.end)


def running() -> SlgRun | None:
    """The SLG run of the generation in progress (sampling code has no ``p``)."""
    generation = GENERATIONS.running()
    return generation.slg if generation is not None else None


def status() -> dict[str, Any]:
    last = GENERATIONS.last
    return {"last_guided_steps": list(last.slg.guided_steps) if last is not None and last.slg else []}


def keep_denoiser_params(params: Any) -> None:
    """``on_cfg_denoiser``: the batch the denoiser is about to run (read at combine time, so changes made
    by other extensions' callbacks after ours are seen)."""
    run = running()
    if run is not None:
        run.pending = params


def condition(cond: Any, image_cond: torch.Tensor) -> dict[str, Any]:
    """A1111's ``make_condition_dict`` for SD3 (dict conds: crossattn + vector)."""
    if isinstance(cond, dict):
        return {**cond, "c_concat": [image_cond]}
    return {"c_crossattn": [cond], "c_concat": [image_cond]}


def rows(cond: Any, n: int) -> Any:
    return {k: v[:n] for k, v in cond.items()} if isinstance(cond, dict) else cond[:n]


def skipped_pass(denoiser: Any, run: SlgRun, n: int) -> torch.Tensor:
    """The first ``n`` (cond) rows of the call in progress, run again with ``run.layers`` skipped."""
    params = run.pending
    with skip_blocks(run.model, run.layers):
        return denoiser.inner_model(params.x[:n], params.sigma[:n],
                                    cond=condition(rows(params.text_cond, n), params.image_cond[:n]))


def make_combine_denoised(original: Callable[..., Any]) -> Callable[..., Any]:
    def combine_denoised(self: Any, x_out: torch.Tensor, conds_list: list, uncond: Any, cond_scale: float) -> Any:
        denoised = original(self, x_out, conds_list, uncond, cond_scale)
        run = running()
        if run is None or run.pending is None or getattr(run.pending, "denoiser", self) is not self:
            return denoised
        step, steps = int(self.step), int(self.steps or 0)
        if not in_window(step, steps, run.start, run.end):
            return denoised
        n = sum(len(conds) for conds in conds_list)
        skipped = skipped_pass(self, run, n)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - skipped[cond_index]) * (weight * run.scale)
        run.guided_steps.append(step)
        return denoised

    return combine_denoised


def layers_within_model(resolved: dict[str, Any]) -> str | None:
    """API check: the requested SLG layers exist in the loaded SD3 model (else HTTP 422)."""
    model = loaded_model()
    if not resolved.get("slg") or not model_is_sd3(model):
        return None
    try:
        checked_layers(resolved["slg_layers"], len(joint_blocks_of(getattr(model, "model", None))))
    except TypeError:
        return None  # no MMDiT to check against: the generation will say so
    except ValueError as error:
        return f"SD3 script arg slg_layers: {error}"
    return None


def _detect() -> str | None:
    module = a1111_module("modules.sd_samplers_cfg_denoiser")
    if module is None:
        return "modules.sd_samplers_cfg_denoiser not importable"
    if not hasattr(getattr(module, "CFGDenoiser", None), "combine_denoised"):
        return "CFGDenoiser.combine_denoised not found"
    if not hasattr(a1111_module("modules.script_callbacks"), "on_cfg_denoiser"):
        return "script_callbacks.on_cfg_denoiser not found"
    return None


def _swaps() -> list[AttributeSwap]:
    from modules import sd_samplers_cfg_denoiser

    return [AttributeSwap(sd_samplers_cfg_denoiser.CFGDenoiser, "combine_denoised", make_combine_denoised)]


def _install(script_callbacks: Any) -> None:
    if hasattr(script_callbacks, "on_cfg_denoiser"):
        script_callbacks.on_cfg_denoiser(keep_denoiser_params)


DECLARED = hooks.Feature(
    FEATURE, patches=(Patch.from_swaps("slg.combine_denoised", FEATURE, _detect, _swaps, sd3_only=True),),
    install=(_install,), api_checks=(layers_within_model,), process=(start,), status=status)
