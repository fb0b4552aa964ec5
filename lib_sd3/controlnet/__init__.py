"""ControlNet for the SD3 family: Stability's SD3.5 Large ControlNets (blur, canny, depth), exact as the reference,
and the SD3 Medium ControlNets in diffusers' layout (InstantX canny / pose / tile), exact as diffusers runs them.

- :mod:`.detect`: what a file is (header only) and whether it fits the loaded base.
- :mod:`.model`: the SD3.5 ControlNet module; :mod:`.joint`: the SD3 Medium (diffusers-layout) one; :mod:`.load`: filled from a file, streamed to the model's dtype;
  :mod:`.cache`: loaded ControlNets kept across generations, released on purpose.
- :mod:`.control`: units, their step window and strength, and the residuals the base's forward adds
  (:data:`lib_sd3.models.mmdit.BlockResiduals`).
- :mod:`.preprocess`: control image -> control latent (resize modes, canny / blur, the reference's scaling).

Pure library: nothing here imports A1111; the WebUI wiring lives in ``lib_sd3/webui/``.
"""
