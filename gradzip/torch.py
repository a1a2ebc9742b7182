"""PyTorch helpers for users who write their own gradient dumps.

    from gradzip.torch import model_update, state_dict_to_numpy
    update = model_update(local_model, global_state)         # local - global, as numpy
    blob = gradzip.Compressor(error_bound=1e-3).compress(update)

- `state_dict_to_numpy` / `numpy_to_state_dict`: a state_dict <-> numpy arrays, bfloat16 kept
  bit for bit (as gradzip's BF16 arrays, see `gradzip.tensorio.as_bfloat16`).
- `model_update` (and its inverse `apply_update`): the update of a model as a dict ready for
  `Compressor.compress` or for safetensors.
- `load_state_dict_file`: read a `.pt`/`.pth` state dict with `torch.load(weights_only=True)`,
  which never runs arbitrary pickled code; without torch it raises a clear InputError.

torch is imported lazily, so `import gradzip.torch` works without it.
"""
from __future__ import annotations

import io
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError
from .tensorio import as_bfloat16, is_bfloat16

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

TORCH_INSTALL_HINT = "install the CPU build with: pip install torch==2.13.0"
TORCH_SUFFIXES = (".pt", ".pth")


def _torch():
    try:
        import torch
    except ImportError:
        raise InputError(f"reading PyTorch files needs torch, which is not installed ({TORCH_INSTALL_HINT})") from None
    return torch


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def is_torch_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(TORCH_SUFFIXES)


# ---------------------------------------------------------------- tensors <-> numpy


def tensor_to_numpy(tensor: "_torch.Tensor", name: str = "tensor") -> np.ndarray:
    """A detached CPU copy as numpy; bfloat16 becomes gradzip's BF16 (raw uint16 bits).
    InputError (naming `name`) for a tensor numpy cannot hold: sparse, nested, on the meta
    device, or of an unsupported dtype."""
    torch = _torch()
    nested = getattr(tensor, "is_nested", False)
    if nested or tensor.layout != torch.strided:
        layout = "nested" if nested else tensor.layout
        raise InputError(f"tensor {name!r} is {layout}: only dense tensors can be compressed (.to_dense() it)")
    if tensor.device.type == "meta":
        raise InputError(f"tensor {name!r} is on the meta device: it has no data")
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        bits = tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
        return as_bfloat16(bits).reshape(tuple(tensor.shape))  # as_bfloat16 makes 0-d arrays 1-d
    if tensor.is_complex() or tensor.dtype in _unsupported_dtypes(torch):
        raise InputError(f"tensor {name!r}: dtype {tensor.dtype} is not supported")
    return np.array(tensor.numpy(), copy=True, order="C")


def _unsupported_dtypes(torch) -> tuple:
    names = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "qint8", "quint8", "qint32")
    return tuple(getattr(torch, n) for n in names if hasattr(torch, n))


def numpy_to_tensor(array: np.ndarray, name: str = "array") -> "_torch.Tensor":
    """A torch tensor owning a copy of `array` (in native byte order); gradzip BF16 arrays
    become torch.bfloat16. InputError for an array torch cannot hold (strings, objects)."""
    torch = _torch()
    if is_bfloat16(array):
        bits = np.array(array.view(np.uint16).view(np.int16), copy=True, order="C")
        return torch.from_numpy(bits).view(torch.bfloat16)
    if array.dtype.kind not in "biufc":
        raise InputError(f"{name!r}: a {array.dtype} array has no torch dtype")
    return torch.from_numpy(np.array(array, dtype=array.dtype.newbyteorder("="), copy=True, order="C"))


def state_dict_to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state_dict (or a module) as {name: numpy array}, in the same order."""
    state_dict = _as_state_dict(state_dict)
    out = {}
    for name, value in state_dict.items():
        if not _is_tensor(value):
            raise InputError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor")
        if str(name) in out:  # (1 and "1": one name once converted)
            raise InputError(f"state_dict entry name {str(name)!r} occurs twice")
        out[str(name)] = tensor_to_numpy(value, str(name))
    return out


def numpy_to_state_dict(arrays: Mapping[str, np.ndarray]) -> "OrderedDict[str, _torch.Tensor]":
    """{name: numpy array} as a state_dict of torch tensors (load it with model.load_state_dict)."""
    return OrderedDict((name, numpy_to_tensor(np.asarray(array), name)) for name, array in arrays.items())


def _is_tensor(value) -> bool:
    torch = _torch()
    return isinstance(value, torch.Tensor)


def _as_state_dict(model_or_state: Any) -> Mapping[str, Any]:
    if hasattr(model_or_state, "state_dict") and callable(model_or_state.state_dict):
        return model_or_state.state_dict()
    if isinstance(model_or_state, Mapping):
        return model_or_state
    raise InputError(f"expected a torch module or a state_dict, got {type(model_or_state).__name__}")


# ---------------------------------------------------------------- updates


def model_update(local: Any, global_: Any, *, floats_only: bool = False) -> dict[str, np.ndarray]:
    """local - global per tensor, as numpy arrays in local's order, ready for Compressor.compress.

    `local` and `global_` are modules, state_dicts, or dicts of numpy arrays with the same names
    and shapes. Float updates keep the tensor's dtype: the difference is computed in float64
    (float32 for BF16) and rounded once. Integer buffers (e.g. batch norm's
    num_batches_tracked) give their exact difference, unless `floats_only` drops them.
    """
    local_arrays, global_arrays = _arrays(local), _arrays(global_)
    missing = [name for name in global_arrays if name not in local_arrays]
    if missing:  # (checked before any difference is computed, as the reverse is in the loop)
        raise InputError(f"tensor {missing[0]!r} is in the global model but not in the local one")
    update = {}
    for name, value in local_arrays.items():
        if name not in global_arrays:
            raise InputError(f"tensor {name!r} is in the local model but not in the global one")
        base = global_arrays[name]
        if base.shape != value.shape or _kind(base) != _kind(value) or base.dtype.str != value.dtype.str:
            raise InputError(f"tensor {name!r}: local {_describe(value)} does not match global {_describe(base)}")
        kind = _kind(value)
        if kind == "bf16":
            diff = _bf16_values(value) - _bf16_values(base)
            update[name] = as_bfloat16(_float32_to_bf16_bits(diff))
        elif kind == "float":
            update[name] = np.asarray(value.astype(np.float64) - base.astype(np.float64)).astype(value.dtype)
        elif floats_only:
            continue
        elif kind == "bool":
            update[name] = np.asarray(value ^ base)
        else:
            update[name] = np.asarray(value - base).astype(value.dtype)
    return update


def apply_update(global_: Any, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """global + update (the inverse of model_update), as numpy arrays in global's order."""
    global_arrays = _arrays(global_)
    unknown = [name for name in update if name not in global_arrays]
    if unknown:  # (a DDP "module." prefix, say: silently ignoring it returned the model unchanged)
        raise InputError(f"update tensor {unknown[0]!r} is not in the model")
    if not all(isinstance(delta, np.ndarray) for delta in update.values()):
        raise InputError("the update's values must be numpy arrays (model_update's, or a decompressed round)")
    out = {}
    for name, base in global_arrays.items():
        if name not in update:
            out[name] = base
            continue
        delta = update[name]
        if delta.shape != base.shape or _kind(delta) != _kind(base) or delta.dtype.str != base.dtype.str:
            raise InputError(f"tensor {name!r}: update {_describe(delta)} does not match model {_describe(base)}")
        kind = _kind(base)
        if kind == "bf16":
            out[name] = as_bfloat16(_float32_to_bf16_bits(_bf16_values(base) + _bf16_values(delta)))
        elif kind == "float":
            out[name] = np.asarray(base.astype(np.float64) + delta.astype(np.float64)).astype(base.dtype)
        elif kind == "bool":
            out[name] = np.asarray(base ^ delta)
        else:
            out[name] = np.asarray(base + delta).astype(base.dtype)
    return out


def _arrays(model_or_arrays: Any) -> dict[str, np.ndarray]:
    if isinstance(model_or_arrays, Mapping) and all(isinstance(v, np.ndarray) for v in model_or_arrays.values()):
        return dict(model_or_arrays)
    return state_dict_to_numpy(_as_state_dict(model_or_arrays))


def _kind(array: np.ndarray) -> str:
    if is_bfloat16(array):
        return "bf16"
    if array.dtype.kind == "f":
        return "float"
    if array.dtype.kind == "b":
        return "bool"
    return str(array.dtype)


def _describe(array: np.ndarray) -> str:
    return f"{'bfloat16' if is_bfloat16(array) else array.dtype}{list(array.shape)}"


def _bf16_values(array: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(array).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    from .floats import narrow

    return np.asarray(narrow(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), "BF16")).view(
        np.uint16).reshape(values.shape)


# ---------------------------------------------------------------- .pt / .pth files


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a .pt/.pth state dict as {name: numpy array}, without unpickling arbitrary objects.

    Nested dicts and lists of tensors (e.g. {"model": state_dict}) are flattened with dotted
    names. Anything other than tensors raises an InputError, as does a file that
    `torch.load(weights_only=True)` refuses.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    return load_state_dict_bytes(data, str(path))


def load_state_dict_bytes(data: bytes, source: str = "input") -> dict[str, np.ndarray]:
    """As load_state_dict_file, for the bytes of a .pt/.pth file (e.g. read from stdin)."""
    torch = _torch()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... on refused or bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{source}: not a PyTorch state dict that loads with weights_only=True ({reason})") from None
    tensors: dict[str, np.ndarray] = {}
    _flatten(obj, "", tensors, source)
    if not tensors:
        raise InputError(f"{source}: holds no tensors")
    return tensors


def _flatten(obj, prefix: str, out: dict, source: str) -> None:
    if _is_tensor(obj):
        name = prefix or "tensor"
        if name in out:
            raise InputError(f"{source}: tensor name {name!r} occurs twice after flattening")
        out[name] = tensor_to_numpy(obj, name)  # (which refuses sparse, nested and meta tensors)
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, source)
    elif isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        for index, value in enumerate(obj):
            _flatten(value, f"{prefix}.{index}" if prefix else str(index), out, source)
    else:
        where = repr(prefix) if prefix else "the top level"
        raise InputError(f"{source}: entry {where} is a {type(obj).__name__}, not a tensor")


def save_state_dict_file(arrays: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write {name: numpy array} as a .pt state dict (torch.save), bfloat16 included."""
    torch = _torch()
    torch.save(numpy_to_state_dict(arrays), path)
