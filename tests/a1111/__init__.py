"""Fakes of AUTOMATIC1111's WebUI for the unit suite, and the fake IC-Light pair both suites load.

- ``webui``: the ``modules`` package container (``FakeWebUI``) with ``shared``, ``script_callbacks`` and gradio.
- ``models``: ``Model``, ``shared.sd_model`` with the family flags A1111 sets (the one SD3 model).
- ``sd3``: ``modules/models/sd3/`` per state (``SD3Cond``, ``SD3Inferencer``) and ``install`` (fixture ``sd3_modules``);
  the construction classes (``install_construction``); a toy MMDiT for skip-layer guidance.
- ``mmdit``: ``TinyMMDiT``, ``modules/models/sd3/mmdit.py``'s layer names at toy size.
- ``other_impls``: ``T5XXLModel`` with T5-XXL's key layout at toy size.
- ``cfg_denoiser``: ``CFGDenoiser`` as skip-layer guidance sees it, ``DictWithShape``.
- ``processing``: ``P`` (``StableDiffusionProcessing``), ``process_images`` and the hooks' order.
- ``scripts``: ``Script``, ``ScriptRunner``, ``errors.report`` and ``load_script_module``.
- ``sampling``: sd_samplers / sd_schedulers / SD3Denoiser with an oracle denoiser (``install``).
- ``iclight/``: huchenlei/sd-forge-ic-light's old (8c2963e) and new (ff82902) script shapes and ``libiclight``.

docs/testing.md says what each one mirrors in A1111 and on which state.
"""
