"""Flower (flwr 1.x Message API) integration: a client Mod and a server strategy wrapper.

Client side, a Mod compresses the float arrays of each train reply::

    from flwr.clientapp import ClientApp
    from gradzip.integrations.flower import GradzipMod

    app = ClientApp(mods=[GradzipMod(error_bound=1e-3, mode="rel")])

Server side, a wrapper decompresses the replies before the wrapped strategy aggregates them::

    from flwr.serverapp.strategy import FedAvg
    from gradzip.integrations.flower import GradzipStrategy

    strategy = GradzipStrategy(FedAvg(fraction_evaluate=0.0))
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=30)

What travels (see docs/integrations.md for the full wire format):

- Each float array of a train reply with more than `min_elements` elements is replaced by an
  `Array` with the same dtype and shape whose stype names the codec (`gradzip/grz` or
  `gradzip/sz3`) and whose data is that tensor's compressed bytes. Smaller and non-float arrays
  pass through untouched.
- By default (`delta=True`) the client compresses the UPDATE: reply minus the array it received
  in the train instruction under the same ArrayRecord key. The error bound then holds for the
  update; the server adds the decoded update back to the array it sent that node, so the
  rebuilt weight differs from the client's by at most the bound plus one rounding of the sum.
- A ConfigRecord `gradzip` in the reply carries the per-round stream head and tail, the names
  of the compressed arrays, which of them are updates, and a digest of the base model the client
  diffed against (the server checks it is the model it sent).

Predictor state. gradzip predicts each round from the previous ones, so both ends keep one
predictor state per client: the client in its node `Context.state` (or in `state_dir`), the
server one per client node id (and ArrayRecord key). In every train instruction the server
announces the digest of the state it holds for that node. When the client's own state differs
(a reply of it was lost, or either side restarted), the client drops its state, compresses the
round from a fresh state and marks it in the stream header (`gradzip.reset` = "1"); the server
then starts that node's state afresh. A reply that still cannot be decoded (its state does not
match) is turned into an error reply, so the strategy counts it as a failure and aggregates the
others; the server then resets that node's state, and the next instruction resynchronizes it.
A client that is simply not sampled for a round keeps its state: neither side advances.
"""
from __future__ import annotations

import urllib.parse
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np

from ..codec import MIN_LOSSY_ELEMENTS
from ..errors import GradzipError
from ..state import PredictorState, load_state, locked, save_state
from ._common import (META_CLIENT, META_RESET, arrays_digest, check_settings, fresh_digest, join_stream,
                      lossy_eligible, make_compressor, split_stream, state_file_name, stream_header, sz3_decode,
                      sz3_encode, warm_up)

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
    from flwr.common import log
    from flwr.common.constant import SType
    from flwr.serverapp.strategy import Strategy
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError("gradzip.integrations.flower needs Flower: pip install 'flwr>=1.20'") from exc

__all__ = ["GradzipMod", "GradzipStrategy", "ReplyStats", "warm_up", "CONFIG_KEY", "STATE_KEY", "STYPE_GRZ",
           "STYPE_SZ3"]

WIRE_VERSION = 1
CONFIG_KEY = "gradzip"  # ConfigRecord: in train replies (codec data) and train instructions (state ack)
STATE_KEY = "gradzip.state"  # ConfigRecord in the client's Context.state: predictor state per ArrayRecord key
STYPE_GRZ = "gradzip/grz"  # Array.stype of a gradzip-compressed tensor
STYPE_SZ3 = "gradzip/sz3"  # Array.stype of an SZ3-compressed tensor (baseline)
_STYPES = {"gradzip": STYPE_GRZ, "sz3": STYPE_SZ3}
_MISMATCH_ERROR_CODE = 1000  # Error.code of a reply the server could not decompress


def _numpy_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        raise GradzipError(f"unknown array dtype {name!r}") from None


def _base_record(instruction: Message, key: str) -> ArrayRecord | None:
    """The ArrayRecord a reply's record `key` is an update of: same key, else the only one."""
    if not instruction.has_content():
        return None
    records = instruction.content.array_records
    if key in records:
        return records[key]
    if len(records) == 1:
        return next(iter(records.values()))
    return None


def _is_numpy(array: Array) -> bool:
    return array.stype == SType.NUMPY


def _message_kind(message: Message) -> str:
    return message.metadata.message_type.split(".", 1)[0]


# ====================================================================== client side


class GradzipMod:
    """Client Mod: compresses the float arrays of outgoing train replies.

    Parameters
    ----------
    error_bound, mode
        gradzip's bound: `rel` (a fraction of each tensor's value range in that round) or `abs`.
    codec
        "gradzip" (default) or "sz3" (the SZ3 baseline through pysz, same per-tensor bound).
    delta
        Compress reply minus the received array (the update) rather than the reply itself.
    min_elements
        Float arrays with at most this many elements pass through uncompressed.
    state_dir
        Keep the predictor state in files `node-<id>-<record key>.state` here (the key
        percent-encoded) instead of in the node's Context.state (e.g. to survive a SuperNode
        restart).
    message_types
        Which replies to compress (default: train replies only).
    **options
        Further gradzip.Compressor options (beta, tau, magnitude_prediction, sign_prediction,
        low_rank, search_every).
    """

    def __init__(self, error_bound: float = 1e-3, mode: str = "rel", *, codec: str = "gradzip", delta: bool = True,
                 min_elements: int = MIN_LOSSY_ELEMENTS, state_dir: str | Path | None = None,
                 message_types: Iterable[str] = (MessageType.TRAIN,), **options):
        check_settings(codec, error_bound, mode, min_elements)
        self.error_bound = float(error_bound)
        self.mode = mode
        self.codec = codec
        self.delta = bool(delta)
        self.min_elements = int(min_elements)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.message_types = tuple(message_types)
        self.options = options
        make_compressor(self.error_bound, mode, self.min_elements, **options)  # validate options now

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if _message_kind(msg) not in self.message_types or reply.has_error() or not reply.has_content():
            return reply
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        ack = msg.content.config_records.get(CONFIG_KEY) if msg.has_content() else None
        info: dict = {"version": WIRE_VERSION, "codec": self.codec}
        raw_bytes = wire_bytes = 0
        reset_any = False
        content = reply.content
        for key in list(content.array_records.keys()):
            record = content.array_records[key]
            result = self._compress_record(key, record, _base_record(msg, key), ack, context)
            if result is None:
                continue
            new_record, fields, raw, wire, reset = result
            content[key] = new_record
            info.update(fields)
            raw_bytes += raw
            wire_bytes += wire
            reset_any |= reset
        if raw_bytes:
            info.update({"reset": reset_any, "raw-bytes": raw_bytes, "wire-bytes": wire_bytes,
                         "compress-seconds": time.process_time() - start_cpu,
                         "compress-wall-seconds": time.perf_counter() - start_wall})
            content[CONFIG_KEY] = ConfigRecord(info)
        return reply

    # ------------------------------------------------------------------ one ArrayRecord

    def _compress_record(self, key: str, record: ArrayRecord, base: ArrayRecord | None, ack: ConfigRecord | None,
                         context: Context):
        values: dict[str, np.ndarray] = {}
        for name, array in record.items():
            if _is_numpy(array):
                value = array.numpy()
                if lossy_eligible(value, self.min_elements) and (self.codec != "sz3" or value.dtype.itemsize >= 4):
                    values[name] = value
        if not values:
            return None
        to_code: dict[str, np.ndarray] = {}
        bases: dict[str, np.ndarray] = {}
        for name, value in values.items():
            if self.delta and base is not None and name in base and _is_numpy(base[name]):
                reference = base[name].numpy()
                if reference.dtype == value.dtype and reference.shape == value.shape:
                    bases[name] = reference
                    to_code[name] = value - reference
                    continue
            to_code[name] = value
        reset = False
        if self.codec == "gradzip":
            state = self._load_state(context, key)
            expected = ack.get(f"digest/{key}", fresh_digest()) if ack is not None else state.digest()
            if state.digest() != expected:
                state, reset = PredictorState(), True
            compressor = make_compressor(self.error_bound, self.mode, self.min_elements, state, **self.options)
            blob = compressor.compress(to_code, metadata={META_RESET: "1" if reset else "0",
                                                          META_CLIENT: str(context.node_id)})
            pieces = split_stream(blob)
            payloads = pieces.parts
            if set(payloads) != set(to_code):
                raise GradzipError(f"the stream's records {sorted(payloads)} do not map one to one onto the arrays "
                                   f"{sorted(to_code)}")
            fields = {f"{key}/head": pieces.head, f"{key}/tail": pieces.tail}
        else:
            payloads = {}
            for name, value in to_code.items():
                data = sz3_encode(value, self.error_bound, self.mode)
                if data is not None:
                    payloads[name] = data
            fields = {}
            if not payloads:
                return None
        stype = _STYPES[self.codec]
        new_record = ArrayRecord()
        raw = wire = 0
        for name, array in record.items():
            if name in payloads:
                new_record[name] = Array(dtype=array.dtype, shape=tuple(array.shape), stype=stype, data=payloads[name])
                raw += len(array.data)
                wire += len(payloads[name])
            else:
                new_record[name] = array
        # In the stream's order: its record frames share one zstd stream, so the server must
        # join the parts in that order.
        names = list(payloads)
        delta_names = [name for name in names if name in bases]
        fields.update({f"{key}/names": names, f"{key}/base": arrays_digest({n: bases[n] for n in delta_names})})
        if delta_names:  # Flower refuses empty lists in a ConfigRecord
            fields[f"{key}/delta"] = delta_names
        wire += sum(len(v) for k, v in fields.items() if isinstance(v, bytes))
        if self.codec == "gradzip":
            self._save_state(context, key, compressor.state)
        return new_record, fields, raw, wire, reset

    # ------------------------------------------------------------------ client state

    def _state_path(self, context: Context, key: str) -> Path:
        return self.state_dir / f"node-{context.node_id}-{state_file_name(key)}.state"

    def _load_state(self, context: Context, key: str) -> PredictorState:
        if self.state_dir is not None:
            return load_state(self._state_path(context, key))
        record = context.state.config_records.get(STATE_KEY)
        if record is None or key not in record:
            return PredictorState()
        return PredictorState.from_bytes(record[key], f"Context.state[{STATE_KEY!r}][{key!r}]")

    def _save_state(self, context: Context, key: str, state: PredictorState) -> None:
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            path = self._state_path(context, key)
            with locked(path, wait=True):
                save_state(state, path)
            return
        record = context.state.config_records.get(STATE_KEY)
        if record is None:
            record = ConfigRecord()
            context.state[STATE_KEY] = record
        record[key] = state.to_bytes()

    def reset_state(self, context: Context) -> None:
        """Forget this client's predictor state: its next reply starts fresh and says so."""
        if self.state_dir is not None:
            for path in self.state_dir.glob(f"node-{context.node_id}-*.state"):
                path.unlink()
        elif STATE_KEY in context.state:
            del context.state[STATE_KEY]


# ====================================================================== server side


@dataclass
class ReplyStats:
    """What one train reply cost: sizes, codec time, and what happened to its state."""

    round: int
    node_id: int
    codec: str  # "gradzip", "sz3" or "none" (an uncompressed reply)
    raw_bytes: int  # the replaced arrays as plain numpy Arrays (plus untouched arrays)
    wire_bytes: int  # what the reply's arrays and gradzip record carried
    compress_seconds: float = 0.0  # client CPU time, as the client reported it
    decompress_seconds: float = 0.0  # server CPU time
    compress_wall_seconds: float = 0.0  # client wall-clock time, as the client reported it
    decompress_wall_seconds: float = 0.0  # server wall-clock time
    reset: bool = False  # the client restarted its predictor state this round
    failed: str = ""  # why the reply could not be decoded (then it was not aggregated)


class GradzipStrategy(Strategy):
    """Wraps a Flower strategy: decompresses gradzip/SZ3 replies, then lets it aggregate.

    The server-to-client broadcast stays uncompressed; each train instruction additionally
    carries a small ConfigRecord `gradzip` announcing the digest of the predictor state the
    server holds for the destination node. `history` lists a ReplyStats per train reply.
    """

    def __init__(self, strategy: Strategy, *, state_dir: str | Path | None = None):
        self.strategy = strategy
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._states: dict[tuple[int, str], PredictorState] = {}
        self._sent: dict[int, Message] = {}  # node id -> its last train instruction
        self.history: list[ReplyStats] = []

    def __getattr__(self, name):  # e.g. weighted_by_key, arrayrecord_key of the wrapped strategy
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    # ------------------------------------------------------------------ state per node

    def _state_path(self, node_id: int, key: str) -> Path:
        return self.state_dir / f"server-node-{node_id}-{state_file_name(key)}.state"

    def state_for(self, node_id: int, key: str) -> PredictorState:
        """The predictor state the server holds for a node's ArrayRecord `key`."""
        if (node_id, key) not in self._states and self.state_dir is not None:
            self._states[(node_id, key)] = load_state(self._state_path(node_id, key))
        return self._states.get((node_id, key)) or PredictorState()

    def _set_state(self, node_id: int, key: str, state: PredictorState) -> None:
        self._states[(node_id, key)] = state
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            save_state(state, self._state_path(node_id, key))

    def reset_node(self, node_id: int) -> None:
        """Forget a node's predictor states (the node will be told to start afresh)."""
        for node, key in [k for k in self._states if k[0] == node_id]:
            self._set_state(node, key, PredictorState())

    def _ack(self, node_id: int) -> ConfigRecord:
        ack = ConfigRecord({"version": WIRE_VERSION})
        for (node, key), state in self._states.items():
            if node == node_id:
                ack[f"digest/{key}"] = state.digest()
                ack[f"round/{key}"] = state.round
        return ack

    # ------------------------------------------------------------------ Strategy interface

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        for message in messages:
            node_id = message.metadata.dst_node_id
            if self.state_dir is not None:  # load what is on disk before announcing it
                for path in self.state_dir.glob(f"server-node-{node_id}-*.state"):
                    key = urllib.parse.unquote(path.name[len(f"server-node-{node_id}-"):-len(".state")])
                    self.state_for(node_id, key)
            # Strategies often share one RecordDict between all messages: give each its own.
            content = RecordDict(dict(message.content.items()))
            content[CONFIG_KEY] = self._ack(node_id)
            message.content = content
            self._sent[node_id] = message
        return messages

    def aggregate_train(self, server_round, replies):
        decoded = [self._decode_reply(server_round, reply) for reply in replies]
        return self.strategy.aggregate_train(server_round, decoded)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(INFO, "\t├──> gradzip: decompresses gradzip/SZ3 train replies, one predictor state per node")
        self.strategy.summary()

    # ------------------------------------------------------------------ decoding

    def _decode_reply(self, server_round: int, reply: Message) -> Message:
        if reply.has_error() or not reply.has_content():
            return reply
        node_id = reply.metadata.src_node_id
        content = reply.content
        info = content.config_records.get(CONFIG_KEY)
        if info is None:
            raw = sum(len(a.data) for r in content.array_records.values() for a in r.values())
            self.history.append(ReplyStats(server_round, node_id, "none", raw, raw))
            return reply
        stats = ReplyStats(server_round, node_id, str(info.get("codec", "?")), _number(info, "raw-bytes", int),
                           _number(info, "wire-bytes", int), _number(info, "compress-seconds", float),
                           compress_wall_seconds=_number(info, "compress-wall-seconds", float))
        untouched = sum(len(a.data) for r in content.array_records.values() for a in r.values()
                        if a.stype not in (STYPE_GRZ, STYPE_SZ3))
        stats.raw_bytes += untouched
        stats.wire_bytes += untouched
        start, start_wall = time.process_time(), time.perf_counter()
        try:
            if info.get("version") != WIRE_VERSION:
                raise GradzipError(f"the reply's gradzip record is of wire version {info.get('version')!r}, this server "
                                   f"reads {WIRE_VERSION}: client and server run different gradzip versions")
            new_content = RecordDict()
            for key, record in content.items():
                if key == CONFIG_KEY:
                    continue
                if isinstance(record, ArrayRecord) and f"{key}/names" in info:
                    try:
                        record, reset = self._decode_record(node_id, key, record, info)
                    except (KeyError, TypeError, ValueError) as exc:  # a field missing or of another type
                        raise GradzipError(f"record {key!r}: malformed gradzip fields ({type(exc).__name__}: {exc})") from None
                    stats.reset |= reset
                new_content[key] = record
        except GradzipError as exc:
            stats.failed = str(exc)
            stats.decompress_seconds = time.process_time() - start
            stats.decompress_wall_seconds = time.perf_counter() - start_wall
            self.history.append(stats)
            log(WARNING, "gradzip: reply of node %s in round %s cannot be decompressed: %s; the node's "
                "predictor state restarts next round", node_id, server_round, exc)
            self.reset_node(node_id)
            return Message(error=Error(_MISMATCH_ERROR_CODE, f"gradzip: {exc}"), metadata=reply.metadata)
        stats.decompress_seconds = time.process_time() - start
        stats.decompress_wall_seconds = time.perf_counter() - start_wall
        self.history.append(stats)
        reply.content = new_content
        return reply

    def _decode_record(self, node_id: int, key: str, record: ArrayRecord, info: ConfigRecord):
        codec = info.get("codec")
        if codec not in _STYPES:
            raise GradzipError(f"reply uses unknown codec {codec!r}")
        names = list(info[f"{key}/names"])
        delta_names = set(info.get(f"{key}/delta", []))
        for name in names:
            if name not in record:
                raise GradzipError(f"record {key!r} lacks the compressed array {name!r}")
            expected_stype = _STYPES.get(codec)
            if record[name].stype != expected_stype:
                raise GradzipError(f"array {name!r} has stype {record[name].stype!r}, expected {expected_stype!r}")
        bases: dict[str, np.ndarray] = {}
        if delta_names:
            instruction = self._sent.get(node_id)
            base = _base_record(instruction, key) if instruction is not None else None
            if base is None or any(name not in base for name in delta_names):
                raise GradzipError(f"the reply holds updates of record {key!r}, but this server sent node "
                                   f"{node_id} no such record")
            bases = {name: base[name].numpy() for name in delta_names}
        if arrays_digest(bases) != info.get(f"{key}/base"):
            raise GradzipError("the client computed its update against a different model than the server sent it")
        reset = False
        if codec == "gradzip":
            blob = join_stream(info[f"{key}/head"], (record[name].data for name in names), info[f"{key}/tail"])
            header = stream_header(blob)
            reset = header.get("metadata", {}).get(META_RESET) == "1"
            from ..api import Decompressor

            state = PredictorState() if reset else self.state_for(node_id, key)
            if header.get("round") == 0 and state.round == 0 and header.get("state_digest") != state.digest():
                raise GradzipError(f"the client's empty predictor state ({header.get('state_digest')}) differs from "
                                   f"the server's ({state.digest()}): client and server run different gradzip "
                                   f"versions (the client says {header.get('created_by', '?')!r})")
            decompressor = Decompressor(state)
            decoded = decompressor.decompress(blob)
            new_state = decompressor.state
        elif codec == "sz3":
            decoded = {name: sz3_decode(record[name].data, _numpy_dtype(record[name].dtype), tuple(record[name].shape))
                       for name in names}
            new_state = None
        else:
            raise GradzipError(f"reply uses unknown codec {codec!r}")
        out = ArrayRecord()
        for name, array in record.items():
            if name not in decoded:
                out[name] = array
                continue
            value = decoded[name]
            if str(value.dtype) != array.dtype or tuple(value.shape) != tuple(array.shape):
                raise GradzipError(f"array {name!r} decoded as {value.dtype}{list(value.shape)}, "
                                   f"the reply declares {array.dtype}{list(array.shape)}")
            if name in bases:
                value = (bases[name] + value).astype(value.dtype, copy=False)
            out[name] = Array(np.ascontiguousarray(value))
        if new_state is not None:  # only once the whole record decoded
            self._set_state(node_id, key, new_state)
        return out, reset

    def stats_by_round(self) -> list[dict]:
        """history as plain dicts (e.g. for JSON)."""
        return [asdict(s) for s in self.history]


def _number(info: ConfigRecord, key: str, kind):
    """A reply's reported figure, or 0 where it is missing or not a number (statistics only:
    a malformed one must not stop the server before the decoding reports what is wrong)."""
    value = info.get(key, 0)
    return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else kind(0)
