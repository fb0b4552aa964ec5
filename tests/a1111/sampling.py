"""Fakes of A1111's sampling modules, with the SD3 model's denoiser the Gaussian oracle.

Shaped after A1111's sd_samplers / sd_samplers_kdiffusion / sd_samplers_timesteps / sd_schedulers and
models/sd3/sd3_model.py, in the two states that differ:

- early SD3 branch (34b4443c): img2img noises with ``x + noise * sigma`` whatever the model; there is
  no DDIM CFG++ and no Simple / Normal / DDIM / Beta schedulers; SD3 has no ``add_noise_to_latent``.
- dev (v1.10+): img2img calls ``sd_model.add_noise_to_latent`` when the model has it (SD3 does).

Only the behaviour the adapter depends on is reproduced: how sigmas are requested from a scheduler
(keyword arguments, ``need_inner_model``), how sampler kwargs are chosen by signature, img2img's
start latent and "Extra noise", the timestep samplers' integer-timestep DDIM, and LCM's sampler class
(sd_samplers_lcm, the same in both states), whose SD1.5 denoiser fails on SD3 as the real one does.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any

import k_diffusion.external
import k_diffusion.sampling
import torch

from a1111.models import Model
from lib_sd3.sampling import flow

K_SAMPLERS = [  # (label, k-diffusion function name or callable, options), as in sd_samplers_kdiffusion
    ("DPM++ 2M", "sample_dpmpp_2m", {"scheduler": "karras"}),
    ("DPM++ SDE", "sample_dpmpp_sde", {"scheduler": "karras", "brownian_noise": True, "second_order": True}),
    ("DPM++ 2M SDE", "sample_dpmpp_2m_sde", {"scheduler": "exponential", "brownian_noise": True}),
    ("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", {"scheduler": "exponential", "brownian_noise": True,
                                                  "solver_type": "heun"}),
    ("DPM++ 2S a", "sample_dpmpp_2s_ancestral", {"scheduler": "karras", "second_order": True}),
    ("DPM++ 3M SDE", "sample_dpmpp_3m_sde", {"scheduler": "exponential", "discard_next_to_last_sigma": True,
                                             "brownian_noise": True}),
    ("Euler a", "sample_euler_ancestral", {}),
    ("Euler", "sample_euler", {}),
    ("LMS", "sample_lms", {}),
    ("Heun", "sample_heun", {"second_order": True}),
    ("DPM2", "sample_dpm_2", {"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True}),
    ("DPM2 a", "sample_dpm_2_ancestral", {"scheduler": "karras", "discard_next_to_last_sigma": True,
                                         "second_order": True}),
    ("DPM fast", "sample_dpm_fast", {}),
    ("DPM adaptive", "sample_dpm_adaptive", {}),
]
EXTRA_PARAMS = {"sample_euler": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
                "sample_heun": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
                "sample_dpm_2": ["s_churn", "s_tmin", "s_tmax", "s_noise"]}


@dataclasses.dataclass
class Scheduler:
    name: str
    label: str
    function: Any
    default_rho: float = -1
    need_inner_model: bool = False


@dataclasses.dataclass
class SamplerData:
    name: str
    constructor: Any
    aliases: list
    options: dict


def make_schedulers(state: str) -> list[Scheduler]:
    def uniform(n, sigma_min, sigma_max, inner_model, device):
        return inner_model.get_sigmas(n).to(device)

    def sgm_uniform(n, sigma_min, sigma_max, inner_model, device):
        start, end = inner_model.sigma_to_t(torch.tensor(sigma_max)), inner_model.sigma_to_t(torch.tensor(sigma_min))
        return torch.FloatTensor([float(inner_model.t_to_sigma(t)) for t in torch.linspace(start, end, n + 1)[:-1]]
                                 + [0.0]).to(device)

    def ays(n, sigma_min, sigma_max, device):  # SD1.5 levels whatever the model: the bug on SD3
        levels = flow.loglinear_interp(flow.AYS_SD15_EDM, n)
        return torch.cat([levels, levels.new_zeros(1)]).float().to(device)

    def kl_optimal(n, sigma_min, sigma_max, device):
        w = torch.arange(n + 1, device=device) / n
        return torch.tan(w * torch.arctan(torch.tensor(sigma_min)) + (1 - w) * torch.arctan(torch.tensor(sigma_max)))

    schedulers = [
        Scheduler("automatic", "Automatic", None),
        Scheduler("uniform", "Uniform", uniform, need_inner_model=True),
        Scheduler("karras", "Karras", k_diffusion.sampling.get_sigmas_karras, default_rho=7.0),
        Scheduler("exponential", "Exponential", k_diffusion.sampling.get_sigmas_exponential),
        Scheduler("polyexponential", "Polyexponential", k_diffusion.sampling.get_sigmas_polyexponential, default_rho=1.0),
        Scheduler("sgm_uniform", "SGM Uniform", sgm_uniform, need_inner_model=True),
        Scheduler("kl_optimal", "KL Optimal", kl_optimal),
        Scheduler("align_your_steps", "Align Your Steps", ays),
    ]
    if state == "dev":
        schedulers += [Scheduler("simple", "Simple", uniform, need_inner_model=True),
                       Scheduler("normal", "Normal", uniform, need_inner_model=True),
                       Scheduler("ddim", "DDIM", uniform, need_inner_model=True),
                       Scheduler("beta", "Beta", uniform, need_inner_model=True)]
    return schedulers


class FakeSD3Model(Model):
    """The fake SD3 model with SD3Inferencer's sampling surface: create_denoiser, alphas_cumprod,
    apply_model(x, sigma, cond) -> x0 (the oracle's), and on dev ``add_noise_to_latent``."""

    cond_stage_key = "txt"
    parameterization = "eps"

    def __init__(self, oracle, uncond_oracle, state: str) -> None:
        super().__init__("SD3", first_stage=state == "dev")
        self.oracle, self.uncond_oracle = oracle, uncond_oracle
        self.model = types.SimpleNamespace(conditioning_key="crossattn",
                                           model_sampling=types.SimpleNamespace(shift=3.0))
        self.model_sigmas = flow.shift_time(torch.arange(1, 1001, dtype=torch.float32) / 1000)
        self.alphas_cumprod = 1 / (self.model_sigmas**2 + 1)
        self.calls: list[torch.Tensor] = []
        if state == "dev":
            self.add_noise_to_latent = lambda x, noise, amount: x * (1 - amount) + noise * amount

    def apply_model(self, x, sigma, cond):
        self.calls.append(x.clone())
        oracle = self.oracle if cond == "cond" else self.uncond_oracle
        return oracle(x.double(), sigma.double()).to(x.dtype)

    def create_denoiser(self):
        from modules.models.sd3.sd3_model import SD3Denoiser

        return SD3Denoiser(self, self.model_sigmas)


def install(webui, state: str, oracle, uncond_oracle=None) -> FakeSD3Model:
    """Put the sampling modules into the fake ``modules`` package; returns the (not yet loaded) SD3 model."""
    opts = webui.shared.opts
    for key, value in dict(eta_ddim=0.0, eta_ancestral=1.0, always_discard_next_to_last_sigma=False,
                           use_old_karras_scheduler_sigmas=False, sigma_min=0.0, sigma_max=0.0, rho=0.0,
                           img2img_extra_noise=0.0, uni_pc_variant="bh1", uni_pc_order=3,
                           uni_pc_lower_order_final=True, beta_dist_alpha=0.6, beta_dist_beta=0.6,
                           no_dpmpp_sde_batch_determinism=True, s_churn=0.0, s_tmin=0.0, s_noise=1.0,
                           sgm_noise_multiplier=False).items():
        opts.data.setdefault(key, value)
    shared = webui.shared

    class SD3Denoiser(k_diffusion.external.DiscreteSchedule):
        def __init__(self, inner_model, sigmas):
            super().__init__(sigmas, quantize=False)
            self.inner_model = inner_model

        def forward(self, input, sigma, **kwargs):
            return self.inner_model.apply_model(input, sigma, **kwargs)

    webui.module("modules.models.sd3.sd3_model", SD3Denoiser=SD3Denoiser)
    schedulers = make_schedulers(state)
    sd_schedulers = webui.module("modules.sd_schedulers", Scheduler=Scheduler, schedulers=schedulers,
                                 schedulers_map={**{s.name: s for s in schedulers}, **{s.label: s for s in schedulers}})

    class CFGDenoiser(torch.nn.Module):
        """cond/uncond through the inner model, combined with the CFG scale (A1111's CFGDenoiser, reduced)."""

        def __init__(self, sampler):
            super().__init__()
            self.sampler, self.model_wrap = sampler, None
            self.init_latent = None
            self.cond_scale_miltiplier = 1.0
            self.need_last_noise_uncond = False
            self.last_noise_uncond = None

        @property
        def inner_model(self):
            if self.model_wrap is None:
                self.model_wrap = shared.sd_model.create_denoiser()
            return self.model_wrap

        def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
            d_cond = self.inner_model(x, sigma, cond=cond)
            d_uncond = self.inner_model(x, sigma, cond=uncond)
            if self.need_last_noise_uncond:
                self.last_noise_uncond = d_uncond.clone()
            return d_uncond + (d_cond - d_uncond) * cond_scale * self.cond_scale_miltiplier

    class Sampler:
        def __init__(self, funcname):
            self.funcname, self.func, self.config, self.p = funcname, funcname, None, None
            self.eta_option_field, self.eta_infotext_field, self.eta_default = "eta_ancestral", "Eta", 1.0
            self.extra_params = []

        def initialize(self, p):
            self.p = p
            self.eta = p.eta if p.eta is not None else getattr(opts, self.eta_option_field, 0.0)
            kwargs = {}
            parameters = inspect.signature(self.func).parameters
            for name in self.extra_params:
                if name in parameters and getattr(p, name, None) is not None:
                    kwargs[name] = getattr(p, name)
            if "eta" in parameters:
                if self.eta != self.eta_default:
                    p.extra_generation_params[self.eta_infotext_field] = self.eta
                kwargs["eta"] = self.eta
            return kwargs

    def setup_img2img_steps(p, steps=None):
        steps = steps or p.steps
        return steps, int(min(p.denoising_strength, 0.999) * steps)

    class KDiffusionSampler(Sampler):
        def __init__(self, funcname, sd_model, options=None):
            super().__init__(funcname)
            self.extra_params = EXTRA_PARAMS.get(funcname, []) if isinstance(funcname, str) else []
            self.func = funcname if callable(funcname) else getattr(k_diffusion.sampling, funcname)
            self.model_wrap_cfg = CFGDenoiser(self)
            self.model_wrap = self.model_wrap_cfg.inner_model

        def get_sigmas(self, p, steps):
            discard = self.config is not None and self.config.options.get("discard_next_to_last_sigma", False)
            steps += 1 if discard else 0
            name = (p.hr_scheduler if p.is_hr_pass else p.scheduler) or "Automatic"
            if name == "Automatic":
                name = self.config.options.get("scheduler", None)
            scheduler = sd_schedulers.schedulers_map.get(name)
            sigma_min, sigma_max = self.model_wrap.sigmas[0].item(), self.model_wrap.sigmas[-1].item()
            if scheduler is None or scheduler.function is None:
                sigmas = self.model_wrap.get_sigmas(steps)
            else:
                kwargs = {"sigma_min": sigma_min, "sigma_max": sigma_max}
                if scheduler.label != "Automatic" and not p.is_hr_pass:
                    p.extra_generation_params["Schedule type"] = scheduler.label
                if scheduler.need_inner_model:
                    kwargs["inner_model"] = self.model_wrap
                sigmas = scheduler.function(n=steps, **kwargs, device="cpu")
            if discard:
                sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
            return sigmas.cpu()

        def _kwargs(self, p, sigmas, sigma_sched=None):
            kwargs = self.initialize(p)
            parameters = inspect.signature(self.func).parameters
            sched = sigmas if sigma_sched is None else sigma_sched
            if "sigma_min" in parameters:
                kwargs["sigma_min"] = float(sched[-2])
                kwargs["sigma_max"] = float(sched[0])
            if "n" in parameters:
                kwargs["n"] = len(sched) - 1
            if "sigmas" in parameters:
                kwargs["sigmas"] = sched
            if self.config.options.get("brownian_noise", False):
                kwargs["noise_sampler"] = None  # A1111: None when no_dpmpp_sde_batch_determinism is set
            if self.config.options.get("solver_type", None) == "heun":
                kwargs["solver_type"] = "heun"
            return kwargs

        def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
            steps = steps or p.steps
            sigmas = self.get_sigmas(p, steps)
            if opts.sgm_noise_multiplier:
                p.extra_generation_params["SGM noise multiplier"] = True
                x = x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
            else:
                x = x * sigmas[0]
            kwargs = self._kwargs(p, sigmas)
            extra = {"cond": conditioning, "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale}
            return self.func(self.model_wrap_cfg, x, extra_args=extra, disable=True, callback=None, **kwargs)

        def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                           image_conditioning=None):
            steps, t_enc = setup_img2img_steps(p, steps)
            sigmas = self.get_sigmas(p, steps)
            sigma_sched = sigmas[steps - t_enc - 1:]
            if state == "dev" and hasattr(shared.sd_model, "add_noise_to_latent"):
                xi = shared.sd_model.add_noise_to_latent(x, noise, sigma_sched[0])
            else:
                xi = x + noise * sigma_sched[0]
            if opts.img2img_extra_noise > 0:
                p.extra_generation_params["Extra noise"] = opts.img2img_extra_noise
                xi = xi + noise * opts.img2img_extra_noise
            kwargs = self._kwargs(p, sigmas, sigma_sched)
            self.model_wrap_cfg.init_latent = x
            extra = {"cond": conditioning, "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale}
            return self.func(self.model_wrap_cfg, xi, extra_args=extra, disable=True, callback=None, **kwargs)

    def timestep_ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
        """A1111's timestep DDIM (eta 0): integer timesteps as the model's sigma, the output read as eps."""
        alphas_cumprod = shared.sd_model.alphas_cumprod
        alphas = alphas_cumprod[timesteps]
        alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))]
        s_in = x.new_ones(x.shape[0])
        for i in range(len(timesteps) - 1):
            index = len(timesteps) - 1 - i
            e_t = model(x, timesteps[index].item() * s_in, **extra_args)
            a_t, a_prev = alphas[index], alphas_prev[index]
            pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
            x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t
        return x

    class CompVisSampler(Sampler):
        def __init__(self, funcname, sd_model):
            super().__init__(funcname)
            self.eta_option_field, self.eta_infotext_field, self.eta_default = "eta_ddim", "Eta DDIM", 0.0
            self.model_wrap_cfg = CFGDenoiser(self)

        def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
            steps = steps or p.steps
            timesteps = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
            kwargs = self.initialize(p)
            extra = {"cond": conditioning, "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale}
            return self.func(self.model_wrap_cfg, x, timesteps=timesteps, extra_args=extra, disable=True, **kwargs)

    def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
        """A1111's sd_samplers_lcm.sample_lcm: denoise, then D + s' z (the VE re-noise)."""
        for i in range(len(sigmas) - 1):
            x = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **extra_args)
            if sigmas[i + 1] > 0:
                x = x + sigmas[i + 1] * torch.randn_like(x)
        return x

    class LCMCompVisDenoiser:
        """A1111's LCM denoiser: SD1.5's eps model over 50 of its alphas_cumprod, on ``model.device``."""

        def __init__(self, model):
            self.alphas_cumprod = torch.zeros(50, device=model.device)  # SD3Inferencer has no .device

    class CFGDenoiserLCM(CFGDenoiser):
        @property
        def inner_model(self):  # an AttributeError inside reads as "object has no attribute 'inner_model'"
            if self.model_wrap is None:
                self.model_wrap = LCMCompVisDenoiser(shared.sd_model)
            return self.model_wrap

    class LCMSampler(KDiffusionSampler):
        def __init__(self, funcname, sd_model, options=None):
            super().__init__(funcname, sd_model, options)
            self.model_wrap_cfg = CFGDenoiserLCM(self)
            self.model_wrap = self.model_wrap_cfg.inner_model

    timestep_samplers = [("DDIM", timestep_ddim, {}), ("PLMS", timestep_ddim, {}), ("UniPC", timestep_ddim, {})]
    if state == "dev":
        timestep_samplers.insert(1, ("DDIM CFG++", timestep_ddim, {}))
    all_samplers = [SamplerData(label, lambda model, f=f: KDiffusionSampler(f, model), [], options)
                    for label, f, options in K_SAMPLERS]
    all_samplers += [SamplerData(label, lambda model, f=f: CompVisSampler(f, model), [], options)
                     for label, f, options in timestep_samplers]
    all_samplers += [SamplerData("LCM", lambda model: LCMSampler(sample_lcm, model), ["k_lcm"], {})]
    samplers_map = {s.name: s for s in all_samplers}

    def find_sampler_config(name):
        return samplers_map.get(name) if name is not None else all_samplers[0]

    def create_sampler(name, model):
        config = find_sampler_config(name)
        assert config is not None, f"bad sampler name: {name}"
        sampler = config.constructor(model)
        sampler.config = config
        return sampler

    webui.module("modules.sd_samplers_common", setup_img2img_steps=setup_img2img_steps, Sampler=Sampler)
    webui.module("modules.sd_samplers_kdiffusion", KDiffusionSampler=KDiffusionSampler, CFGDenoiser=CFGDenoiser)
    webui.module("modules.sd_samplers_timesteps", CompVisSampler=CompVisSampler)
    webui.module("modules.sd_samplers", all_samplers=all_samplers, find_sampler_config=find_sampler_config,
                 create_sampler=create_sampler)
    return FakeSD3Model(oracle, uncond_oracle or oracle, state)

