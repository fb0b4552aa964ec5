"""Fake of ``libiclight/a1111_backend.py``: VAE-encode the foreground with the LDM's first stage,
then patch the UNet's forward through ``p.model_patcher`` (sd-webui-model-patcher)."""


def vae_encode(sd_model, image):
    return sd_model.get_first_stage_encoding(sd_model.encode_first_stage(image))


def apply_ic_light(p, args):
    concat_conds = vae_encode(p.sd_model, args.input_fg)
    p.model_patcher.add_module_patch("diffusion_model", ("c_concat", concat_conds))
