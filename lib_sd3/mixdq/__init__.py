"""MixDQ (ECCV'24) mixed-precision quantization for SD3's MMDiT: real int8 / int4 weights,
int8 activations, bit widths from measured sensitivity.

    from lib_sd3 import mixdq
    state = mixdq.quantize(mmdit, mixdq.load_config("w8a8"))   # in place
    mixdq.restore(mmdit)                                        # bit-identical original

Modules: ``quantizers`` (the integer grids), ``kernels`` (``torch._int_mm`` and its shape rules),
``qlinear`` (the quantized Linear), ``layers`` (SD3 layer names, sd3-ref <-> diffusers),
``config`` (MixDQ-shaped YAML bit configs), ``presets`` (the shipped W8A8 / W4A8 rules),
``model`` (quantize / restore / cache), ``calibrate`` (sensitivity + integer programme; CLI in
``__main__``).
"""

from lib_sd3.mixdq.config import BitConfig, ConfigError
from lib_sd3.mixdq.config import load as load_config
from lib_sd3.mixdq.model import quantize, restore, state
from lib_sd3.mixdq.qlinear import QuantLinear

__all__ = ["BitConfig", "ConfigError", "QuantLinear", "load_config", "quantize", "restore", "state"]
