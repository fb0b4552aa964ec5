"""A Linear layer that really stores int8 or packed int4 weights and multiplies in int8.

``y = x W^T + b`` becomes, with per-token activation scales ``s_x`` (M,) and per-channel weight
scales ``s_w`` (N,):

    y[m, n] = s_x[m] * s_w[n] * sum_k qx[m, k] * qw[n, k] + b[n]      (int32 accumulation)

so the only float work left is quantizing X and one multiply-add per output. int4 weights are
stored packed with group scales and re-expressed on a per-row int8 grid just before the GEMM
(:func:`~lib_sd3.mixdq.quantizers.int4_to_int8`); that transient int8 copy lives for one
call only, so the resident size is 4.25 bits per weight.

The class deliberately is *not* an ``nn.Linear`` subclass: A1111's built-in Lora extension
replaces ``nn.Linear.forward`` for every Linear and would try to merge float deltas into our
integer codes. LoRA reaches a quantized layer as a float low-rank side path instead
(:mod:`lib_sd3.lora.sidepath`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lib_sd3 import get_logger
from lib_sd3.mixdq import kernels, quantizers

log = get_logger("mixdq")

ActMode = Literal["dynamic", "static", "float"]
WeightFormat = Literal["int", "fp8"]
WEIGHT_BITS = (4, 8)
ACT_BITS = (8, 16)
FP32_BYTES = 4
FP16_BYTES = 2
INT4_PER_BYTE = 2


def layer_bytes(out_features: int, in_features: int, w_bits: int, bias: bool, dtype: torch.dtype,
                group_size: int = quantizers.DEFAULT_GROUP_SIZE, static_act: bool = False) -> int:
    """Resident bytes of one layer stored at ``w_bits`` (16 = the float original, in ``dtype``).

    The integer programme budgets with this, so it must equal what :class:`QuantLinear` really
    allocates (a test checks that, buffer by buffer).
    """
    elem = torch.empty((), dtype=dtype).element_size()
    bias_bytes = out_features * elem if bias else 0
    if w_bits == 16:
        return out_features * in_features * elem + bias_bytes
    scales = out_features * FP32_BYTES + (FP32_BYTES if static_act else 0)
    if w_bits == 8:
        return out_features * in_features + scales + bias_bytes
    if w_bits == 4:
        groups = quantizers.int4_group_layout(in_features, group_size)
        return out_features * in_features // INT4_PER_BYTE + out_features * groups * FP16_BYTES + scales + bias_bytes
    raise ValueError(f"weight bits must be one of {WEIGHT_BITS} or 16, got {w_bits}")


class QuantLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear(in_features, out_features)`` with integer weights.

    ``act_mode``: ``dynamic`` quantizes each token (row) of X to int8 on the fly; ``static`` uses
    one calibrated per-tensor scale; ``float`` keeps X in float and multiplies by the dequantized
    weight (weight-only quantization: memory savings, no int8 GEMM). ``float_rows`` leading
    sequence positions (CLIP's BOS token on SD3's text stream) always take the float path: that
    token is a huge, prompt-independent outlier that would otherwise set the activation range.
    """

    def __init__(self, in_features: int, out_features: int, w_bits: int, act_mode: ActMode = "dynamic",
                 bias: bool = True, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 group_size: int = quantizers.DEFAULT_GROUP_SIZE, float_rows: int = 0,
                 weight_format: WeightFormat = "int") -> None:
        super().__init__()
        if w_bits not in WEIGHT_BITS:
            raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {w_bits}")
        if weight_format not in ("int", "fp8") or (weight_format == "fp8" and (w_bits != 8 or act_mode == "static")):
            raise ValueError(f"weight_format must be int, or fp8 with 8 bits and dynamic or float activations; "
                             f"got {weight_format!r} with {w_bits} bits, act {act_mode!r}")
        if act_mode not in ("dynamic", "static", "float"):
            raise ValueError(f"act_mode must be dynamic, static or float, got {act_mode!r}")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.act_mode, self.group_size = w_bits, act_mode, group_size
        self.float_rows = float_rows
        self.compute_dtype = dtype
        self.weight_format = weight_format
        self.kernel = "fp8" if weight_format == "fp8" else "eager"  # a kernels.PATHS name; selection sets it
        n, k = out_features, in_features
        if weight_format == "fp8":
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.float8_e4m3fn, device=device))
        elif w_bits == 8:
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, device=device))  # .t() feeds _int_mm
        else:
            groups = quantizers.int4_group_layout(k, group_size)
            self.register_buffer("qweight", torch.zeros(n, k // INT4_PER_BYTE, dtype=torch.uint8, device=device))
            self.register_buffer("group_ratio", torch.zeros(n, groups, dtype=torch.float16, device=device))
        self.register_buffer("wscale", torch.zeros(n, dtype=torch.float32, device=device))
        if act_mode == "static":
            self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(n, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, w_bits: int, act_mode: ActMode = "dynamic",
                    group_size: int = quantizers.DEFAULT_GROUP_SIZE, act_scale: float | None = None,
                    float_rows: int = 0, weight_format: WeightFormat = "int") -> QuantLinear:
        weight = linear.weight.detach()
        bias = linear.bias.detach() if linear.bias is not None else None
        layer = cls(weight.shape[1], weight.shape[0], w_bits, act_mode, bias is not None, weight.dtype,
                    weight.device, group_size, float_rows, weight_format)
        layer.set_weight(weight, bias)
        if act_mode == "static":
            if act_scale is None or not act_scale > 0:
                raise ValueError("static activation quantization needs a calibrated positive act_scale")
            layer.act_scale.fill_(act_scale)
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if self.weight_format == "fp8":
            q, scale = kernels.fp8_weight(weight)
            self.qweight.copy_(q)
            self.wscale.copy_(scale)
        elif self.w_bits == 8:
            q, scale = quantizers.quantize_weight_int8(weight)
            self.qweight.copy_(q)
            self.wscale.copy_(scale)
        else:
            q, group_scale = quantizers.quantize_weight_int4(weight, self.group_size)
            row_scale = quantizers.symmetric_scale((q.float().reshape(q.shape[0], group_scale.shape[1], -1).abs()
                                                    * group_scale[:, :, None]).amax(dim=(1, 2)), 8)
            self.qweight.copy_(quantizers.pack_int4(q))
            self.group_ratio.copy_(group_scale / row_scale[:, None])
            self.wscale.copy_(row_scale)
        if bias is not None:
            self.bias.copy_(bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the codes stand for, ``(N, K)`` in ``dtype`` (weight-only path and BOS rows)."""
        if self.weight_format == "fp8" or self.w_bits == 8:
            return (self.qweight.float() * self.wscale[:, None]).to(dtype)
        group_scale = self.group_ratio.float() * self.wscale[:, None]
        return quantizers.dequantize_int4(self.qweight, group_scale, dtype)

    def int8_weight(self) -> torch.Tensor:
        """int8 ``(N, K)`` weight on the per-row grid ``wscale``; the GEMM multiplies by its ``.t()``."""
        if self.w_bits == 8:
            return self.qweight
        return quantizers.int4_to_int8(self.qweight, self.group_ratio)

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _float_linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _int8_linear(self, x2: torch.Tensor, plan: kernels.Plan) -> torch.Tensor:
        if self.act_mode == "static":
            qx, sx = quantizers.quantize_per_tensor(x2, self.act_scale), self.act_scale
        else:
            qx, sx = quantizers.quantize_per_token(x2)
        acc = kernels.int8_matmul(qx, self.int8_weight(), plan)
        return self._rescale(acc, sx, x2.dtype)

    def _rescale(self, acc: torch.Tensor, sx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``acc * s_x * s_w + b`` in two passes per row block: the fp32 ``acc * s_x`` overwrites the
        int32 product in place (same size, element for element: no fresh (M, N) buffer and its page
        faults), then one ``addcmul`` applies ``s_w`` and the bias and writes the output dtype."""
        y = acc.view(torch.float32)
        out = y if dtype == torch.float32 else torch.empty(y.shape, dtype=dtype, device=y.device)
        for block in quantizers.row_blocks(y.shape[0], y.shape[1], y.device):
            yb, ob = y[block], out[block]
            torch.mul(acc[block], sx if sx.dim() == 0 else sx[block], out=yb)
            if self.bias is None:
                torch.mul(yb, self.wscale, out=ob)
            else:
                torch.addcmul(self.bias, yb, self.wscale, out=ob)
        return out

    def _eager(self, x2: torch.Tensor) -> torch.Tensor | None:
        device = x2.device.type
        plan = kernels.plan_int_mm(x2.shape[0], self.in_features, self.out_features, device,
                                   kernels.int_mm_available(device))
        return None if plan == "fallback" else self._int8_linear(x2, plan)

    def _compiled(self, x2: torch.Tensor) -> torch.Tensor | None:
        plan = kernels.plan_int_mm(x2.shape[0], self.in_features, self.out_features, x2.device.type)
        if self.act_mode == "static" or plan != "int_mm":  # calibrated scales and tiny M: eager does those
            return self._eager(x2)
        return kernels.COMPILED(x2, self.int8_weight(), self.wscale, self.bias)

    def _fp8(self, x2: torch.Tensor) -> torch.Tensor:
        return kernels.fp8_matmul(x2, self.qweight, self.wscale, self.bias)

    def _fp8_compiled(self, x2: torch.Tensor) -> torch.Tensor:
        return kernels.COMPILED_FP8(x2, self.qweight, self.wscale, self.bias)

    _RUNNERS = {"eager": _eager, "compiled": _compiled, "fp8": _fp8, "fp8_compiled": _fp8_compiled}

    def run_path(self, x2: torch.Tensor, path: str) -> torch.Tensor | None:
        """``path`` alone, errors raised, None where it declines the shape (selection's probe)."""
        if path == "weight_only":
            return self._float_linear(x2)
        return self._RUNNERS[path](self, x2)

    def run(self, x2: torch.Tensor, path: str) -> torch.Tensor:
        """``X (M, K)`` through kernel path ``path`` (a :data:`~lib_sd3.mixdq.kernels.PATHS` name).

        A path that raises (a GPU whose cuBLAS lacks the int8 or FP8 GEMM, a compiler error) is
        dropped for this device for the session, with one log line, and the layer dequantizes.
        """
        runner = self._RUNNERS.get(path) if self.act_mode != "float" and x2.shape[0] else None
        if runner is not None and not kernels.path_failed(path, x2.device.type):
            try:
                out = runner(self, x2)
            except torch.cuda.OutOfMemoryError:
                raise  # not a missing kernel: A1111 reports it and the kernel stays
            except Exception as error:  # noqa: BLE001 -- compile errors come in many types; all mean "not here"
                device = x2.device.type
                kernels.mark_path_failed(path, device)
                if path == "eager":
                    kernels.mark_failed(device)
                log.warning("MixDQ kernel %s failed on %s (%s); quantized layers dequantize instead "
                            "(memory is still saved)", path, device, str(error).splitlines()[0] if str(error) else
                            type(error).__name__)
                out = None
            if out is not None:
                return out
        return self._float_linear(x2)

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        return self.run(x2, self.kernel).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.float_rows
        if rows and x.dim() == 3 and x.shape[1] > rows:
            head = self._float_linear(x[:, :rows])
            return torch.cat((head, self._quantized(x[:, rows:])), dim=1)
        return self._quantized(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"act={self.act_mode}, float_rows={self.float_rows}, format={self.weight_format}, kernel={self.kernel}")
