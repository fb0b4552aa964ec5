"""The fake ``modules.processing``: one processing object ``P`` and ``process_images``'s hook order.

``P`` carries the fields of ``StableDiffusionProcessing`` that sd-webui-sd3, IC-Light and the sampling
fake read (the same names on dev and the early SD3 branch 34b4443c), plus ``model_patcher``, which
sd-webui-model-patcher adds to ``p``. Sampling itself is not caught by A1111: an exception from it fails
the request (HTTP 500 in the API).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from a1111.scripts import PostprocessImageArgs, PostSampleArgs


class ModelPatcher:
    """What sd-webui-model-patcher puts on ``p``; patches are applied around sampling."""

    def __init__(self) -> None:
        self.module_patches: list[tuple[str, Any]] = []

    def add_module_patch(self, name: str, patch: Any) -> None:
        self.module_patches.append((name, patch))


@dataclasses.dataclass(eq=False)  # hashable and weak-referenceable by identity, like A1111's
class StableDiffusionProcessing:
    scripts: Any = None
    sd_model: Any = None
    script_args: list = dataclasses.field(default_factory=list)
    enable_hr: bool = False
    steps: int = 20
    scheduler: str = "Automatic"
    hr_scheduler: str | None = None
    is_hr_pass: bool = False
    cfg_scale: float = 1.0
    eta: float | None = None
    denoising_strength: float = 0.75
    s_churn: float = 0.0
    extra_generation_params: dict = dataclasses.field(default_factory=dict)
    comments: dict = dataclasses.field(default_factory=dict)
    model_patcher: ModelPatcher = dataclasses.field(default_factory=ModelPatcher)
    sampled_with_patches: list = dataclasses.field(default_factory=list)  # what ``sample`` ran with

    def comment(self, text: str) -> None:
        self.comments[text] = 1


P = StableDiffusionProcessing


@dataclasses.dataclass(eq=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    pass


@dataclasses.dataclass(eq=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    init_images: list = dataclasses.field(default_factory=lambda: ["init image"])


class Processed:
    def __init__(self, p: StableDiffusionProcessing, images: list[Any]) -> None:
        self.images = images
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.extra_generation_params = p.extra_generation_params


def sample(p: StableDiffusionProcessing) -> str:
    """The sampler: an IC-Light-patched UNet forward on a model that is not SD1.5 fails the request."""
    patches = list(p.model_patcher.module_patches)
    if patches and not p.sd_model.is_sd1:
        raise TypeError("MMDiT.forward() got multiple values for argument 'y'")
    p.sampled_with_patches.append(patches)
    return "samples"


def process_images(p: StableDiffusionProcessing) -> Processed:
    """``processing.process_images`` for one image: the script hooks in A1111's order."""
    runner = p.scripts
    runner.before_process(p)
    runner.process(p)
    runner.before_process_batch(p, batch_number=0, prompts=[""], seeds=[1], subseeds=[1])
    runner.process_batch(p, batch_number=0, prompts=[""], seeds=[1], subseeds=[1])
    runner.process_before_every_sampling(p, x="x", noise="noise", c="c", uc="uc")
    samples = sample(p)
    if p.enable_hr:
        runner.before_hr(p)
        runner.process_before_every_sampling(p, x=samples, noise="noise", c="c", uc="uc")
        samples = sample(p)
    runner.post_sample(p, PostSampleArgs(samples))
    image = "image"
    runner.postprocess_image(p, PostprocessImageArgs(image))
    processed = Processed(p, [image])
    runner.postprocess(p, processed)
    return processed
