"""Samplers that are correct on SD3's rectified flow, one module per concern, and the NaN guard's wording.

Every sampler takes k-diffusion's arguments ``(model, x, sigmas, extra_args, callback, disable, ...)``
(DPM fast / adaptive: ``sigma_min, sigma_max``) with flow levels s in [0, 1] and a ``model(x, s)`` that
returns the denoised x0, so they drop into A1111's k-diffusion sampler class unchanged.

The flow ODE dx/ds = (x - D) / s has the VE ODE's form, so k-diffusion's deterministic solvers are right on
flow levels as they are. Wrong on flow are A1111's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC: integer
timesteps, output read as eps), which get native flow forms here, and every VE noise formula, because the
flow marginal's signal scale is 1 - s, not 1. Noise-injecting samplers therefore run unchanged in EDM
coordinates (x_edm = x / (1 - s), sigma_edm = s / (1 - s), where x_edm = x0 + sigma_edm e holds exactly),
after an exact first step from pure noise; DPM fast / adaptive, whose step plan is fixed in log sigma, keep
flow levels and take their ancestral noise in flow form. Modules: ``edm`` (any k-diffusion sampler in EDM coordinates, the exact first step), ``ddim`` (DDIM, CFG++,
LCM), ``plms``, ``unipc``, ``dpm`` (DPM fast / adaptive), ``guard`` (the denoiser's NaN guard wording),
``loop`` (progress, seeded noise). Rationale and measured figures: docs/samplers.md.
"""

from lib_sd3.sampling.ddim import ddim_noise_std, ddim_step, sample_flow_ddim, sample_flow_ddim_cfgpp, sample_flow_lcm
from lib_sd3.sampling.dpm import ancestral_split, dpm_fast_orders, sample_flow_dpm_adaptive, sample_flow_dpm_fast
from lib_sd3.sampling.edm import EDM_CAP, edm_route, from_pure_noise, in_edm_space
from lib_sd3.sampling.guard import denoiser_guard, describe_call, describe_step
from lib_sd3.sampling.plms import adams_bashforth_weights, sample_flow_plms
from lib_sd3.sampling.unipc import sample_flow_unipc

__all__ = ["EDM_CAP", "adams_bashforth_weights", "ancestral_split", "ddim_noise_std", "ddim_step", "denoiser_guard",
           "describe_call", "describe_step", "dpm_fast_orders", "edm_route", "from_pure_noise", "in_edm_space",
           "sample_flow_ddim", "sample_flow_ddim_cfgpp", "sample_flow_dpm_adaptive", "sample_flow_dpm_fast",
           "sample_flow_lcm", "sample_flow_plms", "sample_flow_unipc"]
