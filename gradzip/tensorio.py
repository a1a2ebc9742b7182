"""Reading and writing tensor files: safetensors, .npy and .npz.

safetensors is parsed here rather than through `safetensors.numpy`, because numpy has no
bfloat16: BF16 tensors are kept as their raw 16-bit patterns in a uint16 array whose dtype
carries the marker below, so they survive a round trip bit for bit.
"""
from __future__ import annotations

import functools
import io
import json
import math
import struct
import zipfile

import numpy as np

from .errors import InputError

BFLOAT16 = np.dtype(np.uint16, metadata={"gradzip_dtype": "BF16"})

# safetensors dtype name <-> numpy dtype (BF16 handled separately).
_SAFETENSORS_TO_NUMPY = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NUMPY_TO_SAFETENSORS = {dt.str: name for name, dt in _SAFETENSORS_TO_NUMPY.items()}
_NUMPY_TO_SAFETENSORS["|b1"] = "BOOL"
_NUMPY_TO_SAFETENSORS["|i1"] = "I8"
_NUMPY_TO_SAFETENSORS["|u1"] = "U8"

FORMATS = ("safetensors", "npy", "npz")  # written by decompress
READ_FORMATS = FORMATS + ("pt",)  # .pt/.pth state dicts are read (with torch) but written as safetensors
NPY_TENSOR_NAME = "array"  # the single tensor of an .npy file
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
SAFETENSORS_METADATA_KEY = "__metadata__"  # the header entry that holds the file's metadata, not a tensor


def element_count(shape) -> int:
    """Elements of a tensor of this shape (1 for a 0-d scalar); exact for any size (a crafted
    shape cannot wrap around as an int64 product would), and far cheaper than np.prod."""
    return int(math.prod(shape))


def is_bfloat16(array: np.ndarray) -> bool:
    meta = array.dtype.metadata
    return bool(meta) and meta.get("gradzip_dtype") == "BF16"


def as_bfloat16(bits: np.ndarray) -> np.ndarray:
    """Mark a uint16 array of raw bfloat16 bit patterns as bfloat16."""
    return np.ascontiguousarray(bits, dtype=np.uint16).view(BFLOAT16)


def dtype_name(array: np.ndarray) -> str:
    """The safetensors name of an array's dtype ('F32', 'BF16', ...)."""
    dtype = array.dtype
    # By the dtype object itself (held, so its id is not reused): about 100 calls a round of
    # a 20-tensor model, at 0.26 us each through the checks below.
    cached = _NAME_BY_DTYPE_ID.get(id(dtype))
    if cached is not None and cached[0] is dtype:
        return cached[1]
    if is_bfloat16(array):  # before the cache: dtypes compare and hash without their metadata
        name = "BF16"
    else:
        name = _safetensors_name(dtype)
        if name is None:
            raise InputError(f"unsupported dtype {array.dtype}")
    if len(_NAME_BY_DTYPE_ID) < 64:
        _NAME_BY_DTYPE_ID[id(dtype)] = (dtype, name)
    return name


_NAME_BY_DTYPE_ID: dict[int, tuple[np.dtype, str]] = {}


@functools.lru_cache(maxsize=64)
def _safetensors_name(dtype: np.dtype) -> str | None:
    # cached: newbyteorder builds a dtype (a third of this call's cost, 145 calls a round)
    return _NUMPY_TO_SAFETENSORS.get(dtype.newbyteorder("<").str)


def numpy_dtype(name: str) -> np.dtype:
    if name == "BF16":
        return BFLOAT16
    try:
        return _SAFETENSORS_TO_NUMPY[name]
    except KeyError:
        raise InputError(f"unsupported dtype {name!r}") from None


def sniff_format(data: bytes) -> str | None:
    """Guess a tensor file's format from its first bytes."""
    if data[:6] == b"\x93NUMPY":
        return "npy"
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        return "pt" if _is_torch_zip(data) else "npz"
    if len(data) >= 9 and data[8:9] == b"{":
        return "safetensors"
    return None


def _is_torch_zip(data: bytes) -> bool:
    """torch.save writes a zip holding <archive>/data.pkl; an .npz holds only .npy members."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def read_tensors(data: bytes, source: str = "input") -> tuple[dict[str, np.ndarray], str, dict[str, str]]:
    """Parse a tensor file's bytes. Returns (tensors in file order, format, safetensors metadata)."""
    fmt = sniff_format(data)
    try:
        if fmt == "safetensors":
            tensors, metadata = _read_safetensors(data)
            return tensors, fmt, metadata
        if fmt == "npy":
            array = np.load(io.BytesIO(data), allow_pickle=False)
            return {NPY_TENSOR_NAME: _checked_array(array, NPY_TENSOR_NAME)}, fmt, {}
        if fmt == "npz":
            return _read_npz(data), fmt, {}
        if fmt == "pt":
            from .torch import load_state_dict_bytes  # needs torch; says so clearly without it

            return load_state_dict_bytes(data, source), fmt, {}
    except InputError as exc:  # (the .pt reader names the source itself)
        message = str(exc)
        raise InputError(message if message.startswith(f"{source}: ") else f"{source}: {message}") from None
    except (ValueError, OSError, zipfile.BadZipFile, KeyError, EOFError, struct.error, UnicodeDecodeError) as exc:
        raise InputError(f"{source}: not a valid {fmt} file ({exc})") from None
    raise InputError(f"{source}: not a safetensors, .npy, .npz or PyTorch (.pt/.pth) file")


def _checked_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.hasobject or array.dtype.fields is not None:
        raise InputError(f"tensor {name!r} has unsupported dtype {array.dtype}")
    dtype_name(array)
    return array if array.flags.c_contiguous else array.copy(order="C")  # ascontiguousarray makes 0-d 1-d


def _read_npz(data: bytes) -> dict[str, np.ndarray]:
    tensors = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        members = archive.zip.namelist()
        if len(set(members)) != len(members):
            duplicate = next(name for name in members if members.count(name) > 1)
            raise InputError(f"member {duplicate!r} occurs twice in the archive")
        names = archive.files  # (numpy drops ".npy": members "a.npy" and "a" are both "a")
        if len(set(names)) != len(names):
            duplicate = next(name for name in names if names.count(name) > 1)
            raise InputError(f"two members are both named {duplicate!r} (with and without .npy)")
        for name in names:
            array = archive[name]
            if not isinstance(array, np.ndarray):  # (numpy gives the bytes of a member that is not a .npy array)
                raise InputError(f"member {name!r} is not a .npy array")
            tensors[name] = _checked_array(array, name)
    return tensors


def _read_safetensors(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if len(data) < 8:
        raise InputError("truncated safetensors header")
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if header_len > min(MAX_SAFETENSORS_HEADER, len(data) - 8):
        raise InputError("safetensors header length exceeds the file")
    header = json.loads(data[8 : 8 + header_len], object_pairs_hook=_reject_duplicate_keys)
    if not isinstance(header, dict):
        raise InputError("safetensors header is not a JSON object")
    body = memoryview(data)[8 + header_len :]
    metadata = header.pop(SAFETENSORS_METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError("safetensors metadata must map strings to strings")
    # safetensors orders the byte buffer, not the header; keep the header's order of names.
    tensors = {}
    spans = []
    for name, info in header.items():
        try:
            dtype = numpy_dtype(info["dtype"])
            shape, offsets = info["shape"], info["data_offsets"]
            if not all(_is_count(v) for v in (*shape, *offsets)) or len(offsets) != 2:
                raise TypeError
            shape, (begin, end) = tuple(shape), offsets
        except (TypeError, KeyError, ValueError):
            raise InputError(f"malformed safetensors entry for {name!r}") from None
        count = element_count(shape)
        if not 0 <= begin <= end <= len(body) or end - begin != count * dtype.itemsize:
            raise InputError(f"safetensors entry {name!r} does not match the file's size")
        spans.append((begin, end))
        array = np.frombuffer(body[begin:end], dtype=dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype)
        array = array.reshape(shape).copy()
        if info["dtype"] == "BF16":
            array = as_bfloat16(array)
        tensors[name] = array
    # The buffers tile the body, as the format requires: an overlap, a gap or trailing bytes
    # mean a damaged or foreign file, not one to compress silently in part.
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise InputError("safetensors buffers overlap or leave gaps")
        position = end
    if position != len(body):
        raise InputError(f"{len(body) - position} bytes after the safetensors buffers")
    return tensors, {str(k): v for k, v in metadata.items()}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _reject_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise InputError(f"duplicate tensor name {key!r}")
        seen[key] = value
    return seen


def write_tensors(tensors: dict[str, np.ndarray], fmt: str, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize tensors in the given format, keeping their order."""
    if fmt == "safetensors":
        return _write_safetensors(tensors, metadata or {})
    buffer = io.BytesIO()
    if fmt == "npy":
        if len(tensors) != 1:
            raise InputError(f"--format npy holds exactly one tensor, this stream has {len(tensors)}")
        (array,) = tensors.values()
        np.save(buffer, _plain(array), allow_pickle=False)
    elif fmt == "npz":
        _write_npz(buffer, tensors)
    else:
        raise InputError(f"unknown output format {fmt!r}")
    return buffer.getvalue()


def _write_npz(out, tensors: dict[str, np.ndarray]) -> None:
    """np.savez's archive (one stored member NAME.npy a tensor), written member by member:
    savez takes the names as keyword arguments, so a tensor named `file` broke it and one
    named `allow_pickle` was taken as its option and left out."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in tensors.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, _plain(array), allow_pickle=False)


def _plain(array: np.ndarray) -> np.ndarray:
    if is_bfloat16(array):
        raise InputError("bfloat16 tensors can only be written as safetensors (numpy has no bfloat16)")
    return array


def _write_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    if SAFETENSORS_METADATA_KEY in tensors:  # (its entry would be read back as the file's metadata)
        raise InputError(f"a tensor named {SAFETENSORS_METADATA_KEY!r} cannot be written as safetensors, which keeps "
                         "its metadata under that name: write npz (--format npz)")
    header: dict = {}
    if metadata:
        header[SAFETENSORS_METADATA_KEY] = metadata
    offset = 0
    blobs = []
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype_name(array), "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(blobs)
