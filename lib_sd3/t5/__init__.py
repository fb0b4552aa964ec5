"""T5-XXL for SD3: which precision fits, and fp8 weights that stay fp8 (tokenizers: lib_sd3.fetch.tokenizers).

Pure: no A1111 imports. :mod:`lib_sd3.webui.t5` wires these into A1111's ``SD3Cond``, behind the
NaN guard of :mod:`lib_sd3.sampling.nan_guard` (fp16 T5 overflows on some prompts).

Memory facts this rests on (T5-XXL encoder: d_model 4096, d_ff 10240, 24 blocks, vocab 32128):
the Linear weights are 24 x (4 x 4096^2 + 3 x 4096 x 10240) = 4.63 G parameters, the token
embedding 0.13 G. The fp16 file is 9.79 GB; the fp8 file (Linear weights in float8_e4m3fn, the
rest fp16) 4.89 GB. A1111 builds T5 in ``devices.dtype`` and copies the file into it, so on a CPU
(fp32) T5 takes 19.6 GB whatever the file: that is what got a 24 GB machine killed. Loading
with ``assign`` instead keeps each weight in the file's dtype, and A1111's ``AutocastLinear``
already casts its weight to the activation dtype per layer, so fp8 weights are upcast one layer
at a time and never all at once.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lib_sd3.fetch.known_files import T5_FP8, T5_FP16

MODES = ("auto", "fp16", "fp8", "off")
FILES = {"fp16": T5_FP16, "fp8": T5_FP8}
XXL_LINEAR_PARAMS = 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240)  # q, k, v, o + wi_0, wi_1, wo per block
XXL_EMBED_PARAMS = 32128 * 4096  # A1111 builds the embedding without a dtype: fp32
RESIDENT_BYTES = {"fp16": XXL_LINEAR_PARAMS * 2 + XXL_EMBED_PARAMS * 4, "fp8": XXL_LINEAR_PARAMS + XXL_EMBED_PARAMS * 4}
"""T5-XXL's weights in memory once attached: 9.79 GB (fp16), 5.16 GB (fp8)."""
HEADROOM_BYTES = 2 << 30  # activations, CUDA context, the rest of the WebUI: never plan to the last byte
GB = 1e9


# ----------------------------------------------------------------------------------------- mode choice
@dataclasses.dataclass(frozen=True)
class Choice:
    mode: str  # fp16 | fp8 | off
    reason: str


def choose_mode(requested: str, free_ram: int, free_vram: int | None) -> Choice:
    """Pick T5's precision: the requested one if it fits, ``auto``: fp16, else fp8, else off.

    T5 is built and loaded in RAM, then moved to the GPU when there is one, so it must fit in
    free RAM and (on a GPU) in free VRAM, each with :data:`HEADROOM_BYTES` to spare. A mode that
    does not fit is never switched on, requested or not: a WebUI killed for lack of memory is
    worse than a prompt encoded without T5, and the reason says what to free.
    """
    if requested not in MODES:
        raise ValueError(f"T5 mode {requested!r}; allowed: {list(MODES)}")
    if requested == "off":
        return Choice("off", "T5 switched off in settings")
    where = f"{free_ram / GB:.1f} GB free RAM" + (f", {free_vram / GB:.1f} GB free VRAM" if free_vram is not None else "")

    def fits(mode: str) -> bool:
        need = RESIDENT_BYTES[mode] + HEADROOM_BYTES
        return free_ram >= need and (free_vram is None or free_vram >= need)

    candidates = ("fp16", "fp8") if requested == "auto" else (requested,)
    for mode in candidates:
        if fits(mode):
            return Choice(mode, f"{mode}: needs {RESIDENT_BYTES[mode] / GB:.1f} GB (+{HEADROOM_BYTES / GB:.0f} GB "
                                f"headroom), {where}")
    smallest = candidates[-1]
    return Choice("off", f"T5 off: {smallest} needs {(RESIDENT_BYTES[smallest] + HEADROOM_BYTES) / GB:.1f} GB "
                         f"with headroom, only {where}" + ("; try fp8" if requested == "fp16" else ""))


def free_memory() -> tuple[int, int | None]:
    """(available RAM, free VRAM or None without CUDA) in bytes."""
    try:
        import psutil

        ram = int(psutil.virtual_memory().available)
    except ImportError:  # /proc/meminfo is all Linux needs
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        ram = info.get("MemAvailable", info.get("MemFree", 0))
    vram = None
    try:
        import torch

        if torch.cuda.is_available():
            vram = int(torch.cuda.mem_get_info()[0])
    except Exception:  # a broken CUDA set-up must not stop the choice: plan for CPU
        vram = None
    return ram, vram


# ------------------------------------------------------------------------------------------ fp8 weights
def _upcast_linear_forward(self, x):
    """nn.Linear.forward with the weight cast to the input's dtype first (and multiplied by its
    scale, for "scaled fp8" files): one layer at a time."""
    import torch

    bias = self.bias.to(x.dtype) if self.bias is not None else None
    weight = self.weight.to(x.dtype)
    scale = getattr(self, "weight_scale", None)
    if scale is not None:
        weight = weight * scale.to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def read_t5_state(path: Path) -> Iterable[tuple[str, Any]]:
    """(key, tensor) of a T5 file, one tensor in memory at a time (plain reads, no mapping: see
    :mod:`lib_sd3.safetensors_file`); the embedding also under A1111's name when the file holds
    only ``shared.weight``."""
    from lib_sd3.safetensors_file import SafetensorsReader
    from lib_sd3.t5.file_check import EMBEDDING_KEYS

    with SafetensorsReader(path) as reader:
        keys = reader.keys()
        for key in keys:
            yield key, reader.get_tensor(key)
        wanted, alias = EMBEDDING_KEYS
        if wanted not in keys and alias in keys:
            yield wanted, reader.get_tensor(alias)


def load_keeping_dtypes(model, state_dict: Mapping[str, Any] | Iterable[tuple[str, Any]], fp8: bool,
                        strict: bool = False):
    """Load ``state_dict`` (a mapping, or (key, tensor) pairs read one at a time) into ``model``;
    Linear weights keep the file's dtype (fp32 ones become fp16; with ``fp8`` all become fp8), one
    tensor converted at a time, so the peak is what is kept plus one tensor.

    With ``fp8``, every ``nn.Linear`` weight is stored as float8_e4m3fn (converted if the file
    has fp16; except layers the model lists in ``_keep_in_fp32_modules``); every Linear's forward
    casts its weight to the input's dtype per call; every other tensor (embeddings, layer norms,
    relative attention bias) takes the model's own dtype, because embedding lookups and norms
    have no fp8 kernels and are a small share of the bytes. A "scaled fp8" file's weight scales
    (``X.scale_weight`` / ``X.weight_scale``) stay with their layer and are applied per call; its
    activation scales and marker are not needed. Returns ``load_state_dict``'s result.
    """
    import torch

    from lib_sd3.t5.file_check import IGNORED_SUFFIXES, SCALE_SUFFIXES, SCALED_MARKER

    # transformers' T5 names layers that must stay in full precision (its FF casts activations to
    # wo's dtype, which for an fp8 wo would quantize the activations too); A1111's T5 names none.
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    linear_weights = {f"{name}.weight" if name else "weight": module
                      for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    kept = {key for key in linear_weights if (key.split(".")[-2:-1] or [""])[0] in keep}
    narrow = {key for key in linear_weights if fp8 and key not in kept}
    own = model.state_dict()
    prepared, scales = {}, {}
    pairs = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    for key, tensor in pairs:
        owner, _, suffix = key.rpartition(".")
        if key == SCALED_MARKER or (suffix in IGNORED_SUFFIXES and f"{owner}.weight" in linear_weights):
            continue
        if suffix in SCALE_SUFFIXES and f"{owner}.weight" in linear_weights:
            scales[f"{owner}.weight"] = tensor.float()
            continue
        if key not in own:
            prepared[key] = tensor.to("meta")  # reported as unexpected by load_state_dict; its bytes freed now
        elif key in narrow and tensor.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            prepared[key] = tensor.to(torch.float8_e4m3fn)
        elif key in linear_weights and key not in kept:
            # the file's dtype, upcast per layer; a wider file (fp32) is kept at fp16's size, as planned for
            prepared[key] = tensor if tensor.element_size() <= 2 else tensor.to(torch.float16)
        else:
            prepared[key] = tensor.to(own[key].dtype)
    aliases: dict[int, list[str]] = {}  # tied parameters (transformers' shared / embed_tokens)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    result = model.load_state_dict(prepared, strict=strict, assign=True)
    for names in aliases.values():  # assign replaced each alias by its own tensor: tie them again
        first = model.get_parameter(names[0])
        for other in names[1:]:
            owner, _, attr = other.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)
    for key, scale in scales.items():
        module = linear_weights[key]
        out_features = module.weight.shape[0]
        shaped = scale.reshape(-1, 1) if scale.numel() == out_features > 1 else scale.reshape(())
        module.register_buffer("weight_scale", shaped, persistent=False)  # moves with the layer
    for module in linear_weights.values():
        module.weight.requires_grad_(False)
        # Every Linear casts its weight to the activations' dtype: A1111's early T5 uses plain
        # nn.Linear and runs fp32 activations (or autocast) against whatever the file held.
        module.forward = types.MethodType(_upcast_linear_forward, module)
    return result


def parameter_bytes(model) -> int:
    """Bytes held by parameters and buffers: the resident size of a loaded encoder."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
