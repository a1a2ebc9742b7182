"""Predictor state: what the encoder and decoder carry from one round to the next.

Per tensor: its shape and dtype, how many rounds it has been seen, the EMA of normalized
magnitudes (float32), the sign of the last reconstruction (int8), the last two
reconstructions (float32; zeros before the tensor has that many rounds), and the recipe its
last record chose (which the encoder reuses between searches; the decoder reads it off the
same record). The state is updated
only from reconstructed values, so compressor and decompressor hold byte-identical states.

File layout (little-endian): b"GRZSTATE", u32 version, u64 header length, header JSON (sorted
keys; per tensor its digest among the rest), per tensor its four arrays back to back (13 bytes
per element), then the XXH64 of all the bytes before it (docs/format.md).

A tensor's digest names its arrays by their history rather than by hashing them: the XXH64
of the previous state's digest, the round count, the EMA weight and the XXH64 of this round's
reconstruction, from which the fold builds the arrays deterministically on both sides (the
record's check already makes both reconstructions identical). Hashing the arrays took 5
bytes an element every round on each side; the file's own checksum covers them on disk.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import stat
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checksum import fingerprint, xxh64
from .errors import GradzipError, InputError
from .floats import LOSSY_DTYPES
from .tensorio import element_count

STATE_MAGIC = b"GRZSTATE"
# 2: XXH64 fingerprint (1: CRC-32 and Adler-32). 3: the last two reconstructions. 4: recipes.
# 5: a recipe carries its low-rank part's rank, and the fingerprint hashes tensor by tensor.
# 6: tensor digests chained over the rounds, kept in the header; a checksum of the whole file.
# Version 4 and 5 files still load: their tensors' digests are hashed from the arrays.
STATE_VERSION = 6
_READABLE_VERSIONS = (4, 5, 6)
_BYTES_PER_ELEMENT = 13  # ema f32, sign i8, last f32, second_last f32
_CHECKSUM_SIZE = 8


@dataclass
class TensorState:
    shape: tuple[int, ...]
    dtype: str
    rounds: int
    ema: np.ndarray  # float32, flat
    sign: np.ndarray  # int8, flat
    last: np.ndarray  # float32, flat: the last round's reconstruction
    second_last: np.ndarray  # float32, flat: the one before
    # What the last round's record chose, [predictor, variant, low-rank kind, rank]
    # (codec.recipe_of; a version-4 file's lack the rank), for the encoder to reuse between its
    # searches; None where it chose no quantization.
    recipe: list | None = None
    # 8 bytes naming the arrays (module docstring): set by advance_state and by loading; a
    # state with no known history (built by hand, or from a version 4/5 file) is named by its
    # arrays instead.
    chain: bytes | None = field(default=None, repr=False, compare=False)
    # This tensor's entry of the file's header, split at its offset (see _current_head).
    _entry: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def head_entry(self, name: str) -> tuple[str, str]:
        """(JSON before the offset's value, JSON after it) of this tensor's header entry, keys
        sorted; rebuilt where a field it holds changed (a caller may set fields by hand, so
        they are compared by their repr: 16.0 == 16 and True == 1 in Python, not in the file)."""
        fast = _fast_head_entry(name, self)
        if fast is not None:
            return fast
        shown = (repr(name), repr(self.dtype), repr(self.rounds), repr(self.shape), repr(self.recipe))
        key = (*shown, self.digest(), self.ema.size)
        if self._entry is None or self._entry[0] != key:  # (every round: rounds and digest change)
            name_shown, dtype_shown, rounds_shown, shape_shown, recipe_shown = shown
            self._entry = (key, *_entry_pieces(self, _cached_json(dtype_shown, self.dtype), _cached_json(name_shown, name),
                                               _cached_json(recipe_shown, self.recipe),
                                               _cached_json(rounds_shown, self.rounds),
                                               _cached_json(shape_shown, list(self.shape))))
        return self._entry[1], self._entry[2]

    def digest(self) -> bytes:
        if self.chain is None:
            self.chain = array_digest(self)
        return self.chain

    @classmethod
    def fresh(cls, shape: tuple[int, ...], dtype: str, ema: np.ndarray | None = None,
              last: np.ndarray | None = None) -> "TensorState":
        """A tensor's state before its first round (ema: memory for the EMA, which the first
        round's fold overwrites whole, instead of zeros; last: the first reconstruction
        itself, where the caller builds it in place)."""
        n = element_count(shape)
        return cls(tuple(shape), dtype, 0, np.zeros(n, np.float32) if ema is None else ema, np.zeros(n, np.int8),
                   np.zeros(n, np.float32) if last is None else last, _untouched_zeros(n))


def _untouched_zeros(n: int) -> np.ndarray:
    """n float32 zeros for a tensor's first state, whose second-to-last reconstruction is only
    ever read. In private anonymous pages they read as the kernel's shared zero page and take
    no resident memory; np.zeros' heap pages did: 4 bytes an element, 10 MiB more on the first
    round of a 3.2M-parameter transformer (47 -> 38 MiB, as its later rounds). An array under
    a page stays on the heap (a tensor that small is bundled, with no state, anyway)."""
    flags = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    if 4 * n < mmap.PAGESIZE or None in flags:  # (Windows has neither flag)
        return np.zeros(n, np.float32)
    return np.frombuffer(mmap.mmap(-1, 4 * n, flags=flags[0] | flags[1]), np.float32)


def chained_digest(previous: bytes, rounds: int, beta: float, recon_hash: int) -> bytes:
    """A tensor's digest after a round: the arrays are the fold of the previous ones (named by
    `previous`; 8 zero bytes before the first round) and this round's reconstruction (its
    XXH64 as stored), with EMA weight beta."""
    return xxh64(struct.pack("<8sQdQ", previous, rounds, beta, recon_hash)).to_bytes(8, "little")


NO_HISTORY = bytes(8)
_json = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
# JSON of a header field's value, cached: the same few names, shapes and recipes come back
# every round, and encoding them took most of the 9 us a tensor's header entry cost on each
# side. Keyed by the field's repr (which tells 1 from True and 16 from 16.0, as the JSON
# does), or where its types are exactly the usual ones (_fast_head_entry) by a tuple of its
# values, which then cannot confuse those either and spares the reprs (a new state each
# round rebuilt its entries from reprs: about 45 us a round of a 5-tensor state, 6% of a
# small model's decoding). A repr is a str, never one of those tuples.
_JSON_BY_KEY: dict = {}
_JSON_BY_KEY_LIMIT = 1 << 14


def _cached_json(key, value) -> str:
    """_json(value), cached by key (above)."""
    cached = _JSON_BY_KEY.get(key)
    if cached is None:
        if len(_JSON_BY_KEY) >= _JSON_BY_KEY_LIMIT:
            _JSON_BY_KEY.clear()
        cached = _JSON_BY_KEY[key] = _json(value)
    return cached


def _fast_head_entry(name, state: TensorState) -> tuple[str, str] | None:
    """head_entry's pieces where every field has its usual exact type, else None (head_entry
    takes its repr path): the same JSON."""
    dtype, rounds, shape, recipe = state.dtype, state.rounds, state.shape, state.recipe
    if not (type(name) is str and type(dtype) is str and type(rounds) is int and type(shape) is tuple):
        return None
    for d in shape:
        if type(d) is not int:
            return None
    if recipe is None:
        recipe_json = "null"
    elif type(recipe) is list:
        for item in recipe:
            if not (item is None or type(item) is str or type(item) is int):
                return None
        recipe_json = _cached_json(("recipe", *recipe), recipe)
    else:
        return None
    return _entry_pieces(state, _cached_json(("str", dtype), dtype), _cached_json(("str", name), name), recipe_json,
                         str(rounds), _cached_json(("shape", *shape), list(shape)))


def _entry_pieces(state: TensorState, dtype_json, name_json, recipe_json, rounds_json, shape_json) -> tuple[str, str]:
    """A tensor's header entry around its offset, keys sorted, from its fields' JSON."""
    return (f'{{"digest":"{state.digest().hex()}","dtype":{dtype_json},"elements":{int(state.ema.size)},'
            f'"name":{name_json},"offset":',
            f',"recipe":{recipe_json},"rounds":{rounds_json},"shape":{shape_json}}}')


def array_digest(state: TensorState) -> bytes:
    """8 bytes hashed from a tensor's arrays (version 5's tensor digest): the XXH64 of its EMA
    and sign bytes followed by the XXH64s of its last two reconstructions."""
    hashes = struct.pack("<QQ", xxh64(_little_endian(state.last)), xxh64(_little_endian(state.second_last)))
    return fingerprint([_little_endian(state.ema), _little_endian(state.sign), hashes])


@dataclass
class PredictorState:
    round: int = 0  # rounds completed
    tensors: dict[str, TensorState] = field(default_factory=dict)
    last_input_digest: str = ""  # of the last round's input, to catch a round compressed twice

    def _head(self, version: int = STATE_VERSION) -> bytes:
        """The file's bytes before the arrays: magic, version, header length and header (as
        `version` wrote it: before 6, without the tensors' digests)."""
        if version == STATE_VERSION:
            return self._current_head()
        entries = []
        offset = 0
        for name in sorted(self.tensors):
            t = self.tensors[name]
            entries.append({"name": name, "shape": list(t.shape), "dtype": t.dtype, "rounds": t.rounds,
                            "offset": offset, "elements": int(t.ema.size), "recipe": t.recipe})
            offset += t.ema.size * _BYTES_PER_ELEMENT
        header = json.dumps({"round": self.round, "last_input_digest": self.last_input_digest, "tensors": entries},
                            sort_keys=True, separators=(",", ":")).encode()
        return STATE_MAGIC + struct.pack("<IQ", version, len(header)) + header

    def _current_head(self) -> bytes:
        """_head() of this version, the bytes json.dumps(sort_keys=True) would give, built from
        each tensor's entry cached around its offset: this head is hashed every round on both
        sides (digest()), and dumping it whole took 45 us on a 30-tensor transformer."""
        pieces, offset = [], 0
        for name in sorted(self.tensors):
            t = self.tensors[name]
            before, after = t.head_entry(name)
            pieces.append(f"{before}{offset}{after}")
            offset += t.ema.size * _BYTES_PER_ELEMENT
        digest, round_ = self.last_input_digest, self.round
        # (the usual hex digest and int round without json's encoder: 3 us a head)
        digest_json = f'"{digest}"' if type(digest) is str and digest.isascii() and digest.isalnum() else _json(digest)
        round_json = str(round_) if type(round_) is int else _json(round_)
        header = f'{{"last_input_digest":{digest_json},"round":{round_json},"tensors":[{",".join(pieces)}]}}'.encode()
        return STATE_MAGIC + struct.pack("<IQ", STATE_VERSION, len(header)) + header

    def _parts(self) -> list:
        """The file's bytes before its checksum, as pieces (arrays as views, not copies)."""
        arrays = []
        for name in sorted(self.tensors):
            t = self.tensors[name]
            arrays += [_little_endian(t.ema), _little_endian(t.sign), _little_endian(t.last), _little_endian(t.second_last)]
        return [self._head(), *arrays]

    def to_bytes(self) -> bytes:
        body = b"".join(self._parts())
        return body + xxh64(body).to_bytes(_CHECKSUM_SIZE, "little")

    def digest(self) -> str:
        """Short hex digest naming this exact state (stored in streams to catch mismatches):
        the XXH64 of the file's head, which holds every tensor's digest.

        A state is not modified after construction (rounds build new ones), so it is cached.
        """
        cached = self.__dict__.get("_digest")
        if cached is None:
            cached = self.__dict__["_digest"] = xxh64(self._head()).to_bytes(8, "little").hex()
        return cached

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "state") -> "PredictorState":
        fixed = len(STATE_MAGIC) + 12
        if len(data) < fixed + _CHECKSUM_SIZE or data[: len(STATE_MAGIC)] != STATE_MAGIC:
            raise GradzipError(f"{source}: not a gradzip state file")
        body, checksum = data[:-_CHECKSUM_SIZE], data[-_CHECKSUM_SIZE:]
        version, header_len = struct.unpack_from("<IQ", body, len(STATE_MAGIC))
        if version not in _READABLE_VERSIONS:  # before the checksum, which older versions computed otherwise
            raise GradzipError(f"{source}: state format version {version} is not supported "
                               f"(expected {', '.join(map(str, _READABLE_VERSIONS))})")
        if version != 5 and xxh64(body).to_bytes(_CHECKSUM_SIZE, "little") != checksum:  # (4 and 6 hash the file whole)
            raise GradzipError(f"{source}: state file is corrupted (checksum mismatch)")
        if header_len > len(body) - fixed:
            raise GradzipError(f"{source}: state header exceeds the file")
        try:
            header = json.loads(body[fixed : fixed + header_len])
            arrays = memoryview(body)[fixed + header_len :]
            if not isinstance(header["last_input_digest"], str):
                raise ValueError("bad input digest")
            state = cls(round=_count(header["round"], _ROUND_LIMIT), last_input_digest=header["last_input_digest"])
            end = 0
            for entry in header["tensors"]:
                n, offset = _count(entry["elements"]), _count(entry["offset"])
                if offset != end or offset + _BYTES_PER_ELEMENT * n > len(arrays):
                    raise ValueError("array outside the file")
                end = offset + _BYTES_PER_ELEMENT * n
                ema = np.frombuffer(arrays[offset : offset + 4 * n], "<f4").astype(np.float32)
                sign = np.frombuffer(arrays[offset + 4 * n : offset + 5 * n], np.int8).copy()
                last = np.frombuffer(arrays[offset + 5 * n : offset + 9 * n], "<f4").astype(np.float32)
                second_last = np.frombuffer(arrays[offset + 9 * n : offset + 13 * n], "<f4").astype(np.float32)
                shape = tuple(_count(s) for s in entry["shape"])
                if element_count(shape) != n:
                    raise ValueError("shape does not match the array size")
                name, dtype = entry["name"], entry["dtype"]
                if not isinstance(name, str) or name in state.tensors or dtype not in LOSSY_DTYPES:  # (codec.carries_state)
                    raise ValueError("bad or repeated tensor name, or a dtype that carries no state")
                recipe = entry["recipe"]
                if recipe is not None and not _is_recipe(recipe, version):
                    raise ValueError("bad recipe")
                chain = _stored_digest(entry["digest"]) if version >= 6 else None
                rounds = _count(entry["rounds"], _ROUND_LIMIT)
                state.tensors[name] = TensorState(shape, dtype, rounds, ema, sign, last, second_last, recipe, chain)
            if end != len(arrays):
                raise ValueError("bytes after the last array")
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            if version == 5:  # (its checksum is checked once the tensors are read)
                raise GradzipError(f"{source}: state file is corrupted or malformed ({type(exc).__name__})") from None
            raise GradzipError(f"{source}: state file is malformed ({type(exc).__name__})") from None
        if version == 5:
            tensor_digests = [state.tensors[name].digest() for name in sorted(state.tensors)]
            if fingerprint([state._head(5), *tensor_digests]) != checksum:
                raise GradzipError(f"{source}: state file is corrupted (checksum mismatch)")
        return state


def _count(value, limit: int = 1 << 63) -> int:
    """A count, size or offset as a writer stores it: an int (not a bool, float or string,
    which int() would have taken) from 0 below limit (the digests pack rounds as u64)."""
    if type(value) is not int or not 0 <= value < limit:
        raise ValueError("bad count")
    return value


# A round counter must have room to advance: one at 2**63 - 1 was loaded, and the next
# round saved 2**63, which no load accepts (the state was lost).
_ROUND_LIMIT = (1 << 63) - 1


def _stored_digest(text) -> bytes:
    if not (isinstance(text, str) and len(text) == 2 * _CHECKSUM_SIZE and set(text) <= _HEX_DIGITS):
        raise ValueError("bad tensor digest")  # (bytes.fromhex alone would take spaces)
    return bytes.fromhex(text)


_HEX_DIGITS = set("0123456789abcdef")


def _is_recipe(recipe, version: int) -> bool:
    """[predictor, variant, low-rank kind] of strings or None, then (from version 5) the rank:
    an int or None."""
    if not (isinstance(recipe, list) and len(recipe) == (3 if version == 4 else 4)):
        return False
    names, rank = recipe[:3], recipe[3:]
    return (all(isinstance(part, str) or part is None for part in names)
            and all(part is None or (type(part) is int and 0 < part <= 1 << 16) for part in rank))


def _little_endian(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))).cast("B")


def load_state(path: str | os.PathLike, create: bool = True) -> PredictorState:
    """Read a state file; a missing file is a fresh state when create is True."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a state file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if create:
            return PredictorState()
        raise InputError(f"{path}: state file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read state ({exc.strerror})") from None
    return PredictorState.from_bytes(data, str(path))


def save_state(state: PredictorState, path: str | os.PathLike) -> None:
    """Write the state atomically: a temporary file beside it, fsync, then rename."""
    atomic_write(Path(path), state.to_bytes())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace path with data so that readers see either the old or the new file, never a mix.
    A symlink is written through (its target replaced), not replaced by a file of its own:
    a state kept behind a link went on holding the old round while the link held the new."""
    target = Path(os.path.realpath(path))
    try:
        existing = os.stat(target)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror})") from None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        # (a rename would put a file in place of a device or FIFO: /dev/null, for one)
        raise InputError(f"{path}: not a regular file, so not replaced")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        # mkstemp creates 0600: a new file gets ordinary permissions, a replaced one keeps its
        # own (a state chmod 600, which holds reconstructed updates, became 644 every round)
        os.fchmod(fd, stat.S_IMODE(existing.st_mode) if existing is not None else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"{path}: cannot write ({exc.strerror})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def locked(path: str | os.PathLike, wait: bool = False):
    """Hold an exclusive lock on `<state>.lock` so two processes never advance one state
    (the state's real path's: two links to one state take one lock)."""
    lock_path = Path(os.path.realpath(path) + ".lock")
    if not lock_path.parent.is_dir():  # (not made: -o makes its directory, a state's is named by the user)
        raise InputError(f"{path}: the state's directory {lock_path.parent} does not exist")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InputError(f"{lock_path}: cannot create lock file ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise GradzipError(f"{path}: state is in use by another gradzip process") from None
        yield
    finally:
        os.close(fd)
