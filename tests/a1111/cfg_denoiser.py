"""Fake of A1111's ``sd_samplers_cfg_denoiser.CFGDenoiser`` where skip-layer guidance rests on it (same on both states).

Kept: the ``cfg_denoiser`` callback with the batch about to run, one model call on [cond rows, uncond rows],
A1111's own ``combine_denoised`` (copied verbatim), then ``step += 1``; and ``prompt_parser.DictWithShape``.
"""

from __future__ import annotations

import types

import torch
from torch import nn

STEPS = 10


class DictWithShape(dict):
    """prompt_parser.DictWithShape: SD3 conds are dicts that also have a shape."""

    @property
    def shape(self):
        return self["crossattn"].shape


class CFGDenoiser(nn.Module):
    callbacks: list = []

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.step = 0
        self.steps = STEPS
        self.calls = 0

    def inner_model(self, x, sigma, cond):
        self.calls += 1
        return self.model(x, sigma, cond["crossattn"], cond["vector"])

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):  # A1111, verbatim
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)

        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)

        return denoised

    def forward(self, x, sigma, uncond, cond, cond_scale):
        conds_list = [[(i, 1.0)] for i in range(x.shape[0])]
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        image_cond_in = torch.zeros_like(x_in)
        params = types.SimpleNamespace(x=x_in, image_cond=image_cond_in, sigma=sigma_in, text_cond=cond,
                                       text_uncond=uncond, denoiser=self)
        for callback in self.callbacks:
            callback(params)
        cond_in = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        x_out = self.inner_model(params.x, params.sigma, cond={**cond_in, "c_concat": [params.image_cond]})
        denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale)
        self.step += 1
        return denoised
