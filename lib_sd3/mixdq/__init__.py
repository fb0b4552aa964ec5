"""MixDQ (ECCV'24) mixed-precision quantization for SD3's MMDiT: real int8 / int4 weights,
int8 activations, bit widths from measured sensitivity.

    from lib_sd3 import mixdq
    state = mixdq.quantize(mmdit, mixdq.load_config("w8a8"))   # in place
    mixdq.restore(mmdit)                                        # bit-identical original

Modules: ``quantizers`` (the integer grids), ``kernels`` (the table of kernel paths: compiled,
eager int8, fp8, weight-only; ``torch._int_mm`` and its shape rules), ``selection`` (times the
paths on the model's shapes and picks one), ``qlinear`` (the quantized Linear), ``layers`` (SD3 /
SD3.5 layer names, sd3-ref <-> diffusers, config patterns), ``config`` (MixDQ-shaped YAML bit
configs), ``presets`` (the shipped W8A8 / W4A8 / FP8 rules), ``model`` (quantize / restore /
cache; files read tensor by tensor with :mod:`lib_sd3.safetensors_file`), ``calibrate``
(sensitivity + integer programme; CLI in ``__main__``).
"""

from lib_sd3.mixdq.config import BitConfig, ConfigError
from lib_sd3.mixdq.config import load as load_config
from lib_sd3.mixdq.model import quantize, restore, state
from lib_sd3.mixdq.qlinear import QuantLinear

__all__ = ["BitConfig", "ConfigError", "QuantLinear", "load_config", "quantize", "restore", "state"]
