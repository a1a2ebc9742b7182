"""APPFL integration: `GradzipCompressor`, a drop-in for APPFL's SZ3Compressor.

APPFL builds its compressor by name from `comm_configs.compressor_configs.lossy_compressor`,
looking the name up in `appfl.compressor`. Register gradzip there once per process (client and
server) before the agents are created, then name it in the config::

    import gradzip.integrations.appfl
    gradzip.integrations.appfl.register()      # adds appfl.compressor.GradzipCompressor

    # client and server YAML (comm_configs.compressor_configs):
    #   enable_compression: True
    #   lossy_compressor: "GradzipCompressor"
    #   error_bounding_mode: "REL"     # or "ABS"
    #   error_bound: 1e-3
    #   param_cutoff: 1024             # float tensors with at most this many elements: lossless

The class also works without APPFL (it then derives from `object`): `compress_model(model_dict)
-> bytes` and `decompress_model(bytes, model) -> OrderedDict`.

Predictor state. APPFL gives a compressor no client id, so every stream carries a client key
(`client_key` in the config, or a random one per compressor instance, i.e. per client process)
and the server side keeps one predictor state per key. If the server's state for a key does not
match a stream (the server restarted, or a stream was lost), decompress_model raises
gradzip.StateMismatchError naming both states. The client recovers by calling `reset()`, or
automatically every `keyframe_interval` rounds: such a round is compressed from a fresh state
and says so in the stream, and the server then starts that key's state afresh.

Stream layout (no pickle anywhere): b"GRZAPPFL", u32 version, u32 header length, header JSON,
then the .grz streams of the header's parts back to back. The header describes the model's
structure (flat, nested dict, or a batch of models) and holds non-tensor values as JSON.
"""
from __future__ import annotations

import json
import struct
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..api import Decompressor
from ..codec import MIN_LOSSY_ELEMENTS
from ..errors import CorruptStreamError, GradzipError, InputError
from ..state import PredictorState, load_state, save_state
from ._common import META_CLIENT, META_RESET, check_settings, make_compressor, state_file_name, stream_header

try:  # APPFL's base class when APPFL is importable (its compressor package needs zstd, blosc, torch)
    from appfl.compressor.base_compressor import BaseCompressor as _Base
except Exception:  # noqa: BLE001 - any import failure means: no usable APPFL here
    _Base = object

__all__ = ["GradzipCompressor", "register", "APPFL_NAME"]

APPFL_NAME = "GradzipCompressor"
MAGIC = b"GRZAPPFL"
VERSION = 1
_MODES = {"REL": "rel", "ABS": "abs"}
_MAX_HEADER = 64 * 1024 * 1024


def _get(config: Any, name: str, default=None):
    """A setting from an omegaconf DictConfig, a dict or any object with attributes."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(name, default)
    try:
        return getattr(config, name, default)
    except Exception:  # omegaconf raises on missing keys in struct mode
        return default


class GradzipCompressor(_Base):
    """gradzip as an APPFL compressor: error-bounded, predicting each round from the previous."""

    def __init__(self, compressor_config: Any = None):
        mode_name = str(_get(compressor_config, "error_bounding_mode", "REL")).upper()
        if mode_name not in _MODES:
            raise InputError(f"GradzipCompressor supports error_bounding_mode REL or ABS, not {mode_name!r}")
        self.mode = _MODES[mode_name]
        self.error_bound = float(_get(compressor_config, "error_bound", 1e-3))
        self.param_cutoff = int(_get(compressor_config, "param_cutoff", MIN_LOSSY_ELEMENTS))
        check_settings("gradzip", self.error_bound, self.mode, self.param_cutoff)
        key = _get(compressor_config, "client_key", None)
        self.client_key = str(key) if key else uuid.uuid4().hex
        self.keyframe_interval = int(_get(compressor_config, "keyframe_interval", 0) or 0)
        state_dir = _get(compressor_config, "state_dir", None)
        self.state_dir = Path(state_dir) if state_dir else None
        self.cfg = compressor_config
        self._client_states: dict[str, PredictorState] = {}  # per part (stream key) on the client side
        self._server_states: dict[str, PredictorState] = {}  # per stream key on the server side
        self._force_reset = False
        self.last_stats: dict = {}

    # ------------------------------------------------------------------ client side

    def compress_model(self, model: Any, batched: bool = False) -> bytes:
        """Compress one round of a client's model (state dict, nested dict, or a batch)."""
        # Each part's new state is kept aside until the whole call has succeeded: a refusal
        # after some parts (an entry that is not JSON, say) must leave the client's states as
        # they were, or its later rounds would not match the server's.
        parts: list[tuple[dict, bytes, PredictorState]] = []
        if batched and isinstance(model, (list, tuple)):
            layout = {"layout": "batch-list", "items": [self._describe(m, f"/{i}", parts) for i, m in enumerate(model)]}
        elif batched and isinstance(model, Mapping):
            layout = {"layout": "batch-dict", "keys": [str(k) for k in model],
                      "items": [self._describe(m, f"/{k}", parts) for k, m in model.items()]}
        else:
            layout = {"layout": "single", "item": self._describe(model, "", parts)}
        header = {"client": self.client_key, "parts": [info for info, _, _ in parts], **layout}
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        for info, _, state in parts:
            self._save_client_state(info["key"], state)
        self._force_reset = False
        self.last_stats = {"parts": len(parts), "bytes": len(header_bytes) + sum(len(b) for _, b, _ in parts) + 16}
        return MAGIC + struct.pack("<II", VERSION, len(header_bytes)) + header_bytes + b"".join(b for _, b, _ in parts)

    def _describe(self, model: Any, suffix: str, parts: list) -> dict:
        """Layout of one model; its tensors become one .grz part (or one per nested dict)."""
        if hasattr(model, "state_dict") and callable(model.state_dict):
            model = model.state_dict()
        if not isinstance(model, Mapping):
            raise InputError(f"compress_model expects a dict of tensors, got {type(model).__name__}")
        if any(isinstance(v, Mapping) for v in model.values()):
            entries = []
            for key, value in model.items():
                if isinstance(value, Mapping):
                    entries.append({"key": str(key), "part": self._add_part(value, f"{suffix}/{key}", parts)})
                else:
                    entries.append({"key": str(key), "value": _json_value(key, value)})
            return {"kind": "nested", "entries": entries}
        return {"kind": "tensors", "part": self._add_part(model, suffix, parts)}

    def _add_part(self, tensors: Mapping, suffix: str, parts: list) -> int:
        arrays, torch_names = _to_numpy(tensors)
        stream_key = self.client_key + suffix
        state = self._load_client_state(stream_key)
        reset = self._force_reset or (self.keyframe_interval > 0 and state.round > 0
                                      and state.round % self.keyframe_interval == 0)
        if reset:
            state = PredictorState()
        # APPFL's param_cutoff means "sent exactly", as with its SZ compressors: keep that meaning.
        compressor = make_compressor(self.error_bound, self.mode, self.param_cutoff, state, exact_small=True)
        blob = compressor.compress(arrays, metadata={META_CLIENT: stream_key, META_RESET: "1" if reset else "0"})
        parts.append(({"key": stream_key, "bytes": len(blob), "torch": torch_names}, blob, compressor.state))
        return len(parts) - 1

    def reset(self) -> None:
        """Drop the client's predictor state: the next round starts fresh and says so."""
        self._client_states.clear()
        self._force_reset = True

    def _state_path(self, side: str, key: str) -> Path:
        return self.state_dir / f"appfl-{side}-{state_file_name(key)}.state"

    def _load_client_state(self, key: str) -> PredictorState:
        if key not in self._client_states and self.state_dir is not None:
            self._client_states[key] = load_state(self._state_path("client", key))
        return self._client_states.get(key) or PredictorState()

    def _save_client_state(self, key: str, state: PredictorState) -> None:
        self._client_states[key] = state
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            save_state(state, self._state_path("client", key))

    # ------------------------------------------------------------------ server side

    def decompress_model(self, compressed_model: bytes, model: Any = None, batched: bool = False):
        """Rebuild what compress_model was given, as torch tensors (numpy without torch).

        `model` (a torch module or state dict, as APPFL passes) only orders the result like
        the model's own state dict; names, shapes and dtypes come from the stream.
        """
        header, blobs = _parse(compressed_model)
        decoded: list[dict[str, Any]] = []
        for info, blob in zip(header["parts"], blobs):
            decoded.append(self._decode_part(info, blob))
        order = _state_dict_keys(model)
        layout = header.get("layout")
        if layout == "single":
            return self._rebuild(header["item"], decoded, order)
        if layout == "batch-list":
            return [self._rebuild(item, decoded, order) for item in header["items"]]
        if layout == "batch-dict":
            return OrderedDict((key, self._rebuild(item, decoded, order))
                               for key, item in zip(header["keys"], header["items"]))
        raise CorruptStreamError(f"unknown APPFL stream layout {layout!r}")

    def _decode_part(self, info: dict, blob: bytes) -> dict[str, Any]:
        key = str(info.get("key"))
        stream = stream_header(blob)
        if stream.get("metadata", {}).get(META_CLIENT) != key:
            raise CorruptStreamError(f"part {key!r} holds a stream of client {stream.get('metadata', {}).get(META_CLIENT)!r}")
        reset = stream["metadata"].get(META_RESET) == "1"
        state = PredictorState() if reset else self._server_state(key)
        decompressor = Decompressor(state)
        try:
            arrays = decompressor.decompress(blob)
        except GradzipError as exc:
            raise type(exc)(f"client {key!r}: {exc}") from None
        self._server_states[key] = decompressor.state
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            save_state(decompressor.state, self._state_path("server", key))
        return _from_numpy(arrays, set(info.get("torch", [])))

    def _server_state(self, key: str) -> PredictorState:
        if key not in self._server_states and self.state_dir is not None:
            self._server_states[key] = load_state(self._state_path("server", key))
        return self._server_states.get(key) or PredictorState()

    def _rebuild(self, item: dict, decoded: list, order: list[str] | None):
        kind = item.get("kind")
        if kind == "tensors":
            return _ordered(decoded[_index(item["part"], decoded)], order)
        if kind == "nested":
            out = OrderedDict()
            for entry in item["entries"]:
                out[entry["key"]] = (_ordered(decoded[_index(entry["part"], decoded)], None) if "part" in entry
                                     else entry.get("value"))
            return out
        raise CorruptStreamError(f"unknown model kind {kind!r}")


def _index(value, decoded) -> int:
    if not isinstance(value, int) or not 0 <= value < len(decoded):
        raise CorruptStreamError("stream refers to a part it does not hold")
    return value


def _parse(data: bytes) -> tuple[dict, list[bytes]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"decompress_model expects bytes, got {type(data).__name__}")
    data = bytes(data)
    fixed = len(MAGIC) + 8
    if len(data) < fixed or data[: len(MAGIC)] != MAGIC:
        raise CorruptStreamError("not a gradzip APPFL stream (bad magic number)")
    version, length = struct.unpack_from("<II", data, len(MAGIC))
    if version != VERSION:
        raise CorruptStreamError(f"APPFL stream version {version} is not supported (expected {VERSION})")
    if length > min(_MAX_HEADER, len(data) - fixed):
        raise CorruptStreamError("APPFL stream header exceeds the data")
    try:
        header = json.loads(data[fixed: fixed + length])
        sizes = [int(p["bytes"]) for p in header["parts"]]
    except (ValueError, KeyError, TypeError):
        raise CorruptStreamError("APPFL stream header is malformed") from None
    position = fixed + length
    if any(s < 0 for s in sizes) or position + sum(sizes) != len(data):
        raise CorruptStreamError("APPFL stream parts do not match its length")
    blobs = []
    for size in sizes:
        blobs.append(data[position: position + size])
        position += size
    return header, blobs


def _to_numpy(tensors: Mapping) -> tuple[dict[str, np.ndarray], list[str]]:
    arrays, torch_names = {}, []
    for name, value in tensors.items():
        name = str(name)
        if isinstance(value, np.ndarray):
            arrays[name] = value
        elif type(value).__module__.startswith("torch") and hasattr(value, "detach"):
            from ..torch import tensor_to_numpy

            arrays[name] = tensor_to_numpy(value)
            torch_names.append(name)
        else:
            raise InputError(f"model entry {name!r} is a {type(value).__name__}, not a tensor")
    return arrays, torch_names


def _from_numpy(arrays: dict[str, np.ndarray], torch_names: set[str]) -> dict[str, Any]:
    """The model as APPFL gets it: torch tensors where the client sent them, and writable
    numpy arrays (decompress returns read-only views of the server's state)."""
    if torch_names:
        from ..torch import numpy_to_tensor
    return {name: numpy_to_tensor(a) if name in torch_names else np.array(a) for name, a in arrays.items()}


def _json_value(key, value):
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise InputError(f"model entry {key!r} ({type(value).__name__}) is neither a tensor dict nor a JSON value") from None
    return value


def _state_dict_keys(model: Any) -> list[str] | None:
    if model is None:
        return None
    if hasattr(model, "state_dict") and callable(model.state_dict):
        return list(model.state_dict().keys())
    if isinstance(model, Mapping):
        return [str(k) for k in model.keys()]
    return None


def _ordered(tensors: dict[str, Any], order: list[str] | None) -> OrderedDict:
    if order and set(order) == set(tensors):
        return OrderedDict((name, tensors[name]) for name in order)
    return OrderedDict(tensors)


def register() -> type:
    """Make APPFL find `GradzipCompressor` by name (appfl.compressor.GradzipCompressor)."""
    try:
        import appfl.compressor as appfl_compressor
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot import appfl.compressor ({exc}); install APPFL first") from None
    setattr(appfl_compressor, APPFL_NAME, GradzipCompressor)
    return GradzipCompressor
