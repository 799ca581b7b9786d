"""How a model's weights are stored: float32, bfloat16 (2018 4th place) or partial 8-bit quantization (2018
1st place, §3.2 and Table 2: only the variables with more than 17,000 elements, 8 bits each, the rest float32,
cast back to float32 at load; FVNet 467.5 MB -> 117 MB for a GAP of 0.87236 -> 0.87237).

The 8-bit rule follows the 1st place's `quantize.py` (github.com/miha-skalic/youtube8mchallenge,
`--transform_type quant_uniform`), which the paper leaves at "min-max uniform quantization": per tensor,
256 levels `linspace(min, max, 256)` and each value coded as its nearest level (scipy's `vq`), an exact tie
going to the lower level; only float32 variables with strictly more than `--min_elements` (17,000) elements.
Two differences: the levels are computed in float32 by `torch.linspace` from the tensor's float32 min and
max, which are all that is stored (8 bytes, where the authors stored the 256 levels), and the nearest level
is the nearest of those float32 levels, so that a value decodes to exactly the level it was matched to.
Codes are therefore `round((x - min) / step)` with `step = (max - min) / 255`, except within float32
rounding of a midpoint between two levels.

A packed state (`pack_state`) is plain tensors, numbers and strings, for `torch.load(weights_only=True)`:

    {"format": "yt8m-state", "version": 1, "storage": "fp32" | "bf16" | "int8-partial",
     "min_elements": int, "tensors": {name: tensor | {"codes": uint8 tensor, "min": float, "max": float}}}

Every tensor it holds owns exactly its own bytes (no view of a larger buffer), so its payload is the sum of
`stored_bytes` over the state, which size reports and budget checks count.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["DEFAULT_MIN_ELEMENTS", "STORAGES", "dequantize", "pack_state", "packed_bytes", "quantize", "stored_bytes",
           "unpack_state"]

STORAGES = ("fp32", "bf16", "int8-partial")
DEFAULT_MIN_ELEMENTS = 17_000
FORMAT = "yt8m-state"
VERSION = 1
LEVELS = 256
_QUANTIZED_KEYS = {"codes", "min", "max"}
_RANGE_BYTES = 8  # a quantized tensor's min and max, as two float32
_CHUNK = 1 << 22  # elements coded at a time, bounding the float64 copy quantize makes


def _levels(minimum: float, maximum: float) -> torch.Tensor:
    """The 256 float32 levels of [minimum, maximum]; quantize and dequantize share them."""
    if not (math.isfinite(minimum) and math.isfinite(maximum) and minimum <= maximum):
        raise ValueError(f"quantization range: expected finite min <= max, found min={minimum!r}, max={maximum!r}")
    levels = torch.linspace(minimum, maximum, LEVELS, dtype=torch.float32)
    if not torch.isfinite(levels).all():  # a range wider than float32 holds: its steps overflow
        raise ValueError(f"quantization range: max - min = {maximum - minimum:.3g} exceeds float32, whose levels "
                         "would overflow; store this tensor in fp32")
    return levels


def quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(uint8 codes of the same shape, min, max): each value's nearest of 256 uniform levels between the
    tensor's min and max (float32 values, as Python floats); a constant tensor codes to all zeros."""
    if not tensor.is_floating_point():
        raise ValueError(f"quantize: expected a floating tensor, found {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"quantize: expected a non-empty tensor, found shape {list(tensor.shape)}")
    values = tensor.detach().to(torch.float32).reshape(-1)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("quantize: expected finite values, found NaN or infinity")
    minimum, maximum = float(values.min()), float(values.max())
    levels = _levels(minimum, maximum).to(torch.float64)
    midpoints = ((levels[:-1] + levels[1:]) / 2).to(values.device)  # [255], exact in float64
    codes = torch.empty(values.numel(), dtype=torch.uint8, device=values.device)
    for start in range(0, values.numel(), _CHUNK):
        # midpoints[i-1] < x <= midpoints[i] -> level i: the nearest level, a tie to the lower one
        chunk = values[start:start + _CHUNK].to(torch.float64)
        codes[start:start + _CHUNK] = torch.bucketize(chunk, midpoints, out_int32=True).to(torch.uint8)
    return codes.reshape(tensor.shape), minimum, maximum


def dequantize(codes: torch.Tensor, minimum: float, maximum: float) -> torch.Tensor:
    """float32 levels[codes], levels = linspace(minimum, maximum, 256): `quantize`'s inverse to within half a
    step, (max - min) / 510, up to float32 rounding of the levels."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        found = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"codes: expected a uint8 tensor, found {found}")
    for key, value in (("min", minimum), ("max", maximum)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{key}: expected a number, found {type(value).__name__}")
    return _levels(float(minimum), float(maximum)).to(codes.device)[codes.int()]


def _check_scheme(storage: str, min_elements: int) -> None:
    if storage not in STORAGES:
        raise ValueError(f"storage: expected one of {', '.join(STORAGES)}, found {storage!r}")
    if isinstance(min_elements, bool) or not isinstance(min_elements, int) or min_elements < 0:
        raise ValueError(f"min_elements: expected an integer >= 0, found {min_elements!r}")


def _is_quantized(tensor: torch.Tensor, storage: str, min_elements: int) -> bool:
    return storage == "int8-partial" and tensor.is_floating_point() and tensor.numel() > min_elements


def _stored_dtype(tensor: torch.Tensor, storage: str) -> torch.dtype:
    """The dtype `tensor` is kept in when it is not quantized."""
    if not tensor.is_floating_point():
        return tensor.dtype
    return torch.bfloat16 if storage == "bf16" else torch.float32


def stored_bytes(tensor: torch.Tensor, storage: str, min_elements: int = DEFAULT_MIN_ELEMENTS) -> int:
    """The bytes `tensor` takes in a state packed under `storage`: 1 per element + 8 (min, max) when quantized,
    else 4 (fp32) or 2 (bf16) per floating element; other tensors their own element size."""
    _check_scheme(storage, min_elements)
    if _is_quantized(tensor, storage, min_elements):
        return tensor.numel() + _RANGE_BYTES
    return tensor.numel() * _stored_dtype(tensor, storage).itemsize


def packed_bytes(packed: dict) -> int:
    """The bytes a packed state holds: what `stored_bytes` counts for each of its tensors."""
    return sum(entry["codes"].numel() + _RANGE_BYTES if isinstance(entry, dict) else
               entry.numel() * entry.element_size() for entry in packed["tensors"].values())


def pack_state(state: dict[str, torch.Tensor], storage: str, min_elements: int = DEFAULT_MIN_ELEMENTS) -> dict:
    """A state dict stored under `storage` (see the module docstring), on the CPU, for torch.save."""
    _check_scheme(storage, min_elements)
    tensors: dict[str, torch.Tensor | dict] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state[{name!r}]: expected a tensor, found {type(tensor).__name__}")
        tensor = tensor.detach().cpu()
        if _is_quantized(tensor, storage, min_elements):
            codes, minimum, maximum = quantize(tensor)
            tensors[name] = {"codes": codes, "min": minimum, "max": maximum}
        else:
            # copy=True: a view of a larger buffer would make torch.save write the whole buffer
            tensors[name] = tensor.to(_stored_dtype(tensor, storage), copy=True)
    return {"format": FORMAT, "version": VERSION, "storage": storage, "min_elements": min_elements,
            "tensors": tensors}


def _unpack_entry(name: str, entry, storage: str, min_elements: int) -> torch.Tensor:
    where = f"packed state, tensor {name!r}"
    if isinstance(entry, dict):
        if storage != "int8-partial":
            raise ValueError(f"{where}: a quantized entry in a {storage} state (only int8-partial quantizes)")
        if set(entry) != _QUANTIZED_KEYS:
            raise ValueError(f"{where}: expected keys {sorted(_QUANTIZED_KEYS)}, found {sorted(map(str, entry))}")
        try:
            tensor = dequantize(entry["codes"], entry["min"], entry["max"])
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if tensor.numel() <= min_elements:
            raise ValueError(f"{where}: quantized with {tensor.numel()} elements, but int8-partial quantizes only "
                             f"tensors of more than {min_elements}")
        return tensor
    if not isinstance(entry, torch.Tensor):
        raise ValueError(f"{where}: expected a tensor or a quantized entry, found {type(entry).__name__}")
    if entry.is_floating_point():
        if _is_quantized(entry, storage, min_elements):
            raise ValueError(f"{where}: {entry.numel()} elements stored as {entry.dtype}, but int8-partial "
                             f"quantizes every floating tensor of more than {min_elements}")
        expected = _stored_dtype(entry, storage)
        if entry.dtype != expected:
            raise ValueError(f"{where}: expected {expected} under {storage}, found {entry.dtype}")
        return entry.to(torch.float32)
    return entry


def unpack_state(packed: dict) -> dict[str, torch.Tensor]:
    """The state dict of a packed state: floating tensors in float32, other tensors as they were packed."""
    if not isinstance(packed, dict):
        raise ValueError(f"packed state: expected a dict, found {type(packed).__name__}")
    missing = [key for key in ("format", "version", "storage", "min_elements", "tensors") if key not in packed]
    if missing:
        raise ValueError(f"packed state: missing key(s) {', '.join(missing)} (found {sorted(map(str, packed))})")
    if packed["format"] != FORMAT or packed["version"] != VERSION:
        raise ValueError(f"packed state: expected format {FORMAT!r} version {VERSION}, found "
                         f"{packed['format']!r} version {packed['version']!r}")
    storage, min_elements, tensors = packed["storage"], packed["min_elements"], packed["tensors"]
    try:
        _check_scheme(storage, min_elements)
    except ValueError as error:
        raise ValueError(f"packed state: {error}") from None
    if not isinstance(tensors, dict):
        raise ValueError(f"packed state: expected a dict of tensors, found {type(tensors).__name__}")
    return {name: _unpack_entry(name, entry, storage, min_elements) for name, entry in tensors.items()}
