"""gradzip's Flower adapter, through Flower's own objects: ClientApp with the Mod, the FedAvg
strategy wrapped by GradzipStrategy and driven by Strategy.start, and every message serialized
and rebuilt with Flower's object (de)serialization, as its transport does.

The Grid here delivers messages in-process to real ClientApps (the end-to-end experiment's smoke
test runs the same adapter through a real SuperLink and SuperNodes).
"""
from __future__ import annotations

import uuid

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

try:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
    from flwr.supercore.task_identity import TaskIdentity
except ImportError:  # pragma: no cover - older flwr
    pytest.skip("needs flwr >= 1.42 internals for in-process delivery", allow_module_level=True)

from gradzip.errors import InputError  # noqa: E402
from gradzip.integrations.flower import CONFIG_KEY, STATE_KEY, STYPE_GRZ, STYPE_SZ3, GradzipMod, GradzipStrategy  # noqa: E402

SHAPES = {"conv.weight": (32, 16, 3, 3), "conv.bias": (32,), "fc.weight": (10, 256), "fc.bias": (10,)}


def wire(message: Message) -> Message:
    """Serialize a message into Flower's object contents and rebuild it, as its transport does."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    rebuilt = inflate_object_from_contents(message.object_id, contents)
    rebuilt.metadata.__dict__["_message_id"] = message.metadata.message_id
    return rebuilt


class LoopbackGrid(Grid):
    """A Grid that hands each message to a real ClientApp in this process.

    `drop(node_id, round)` decides whether a node's reply gets lost on the way back.
    """

    def __init__(self, apps: dict[int, ClientApp], drop=None):
        self.apps = apps
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                         for node in apps}
        self.drop = drop or (lambda node, rnd: False)
        self.delivered: list[Message] = []  # instructions as the clients received them
        self.returned: list[Message] = []  # replies as the server received them
        self._replies: dict[str, Message] = {}

    def set_run(self, run):  # pragma: no cover - unused
        self._run = run

    @property
    def run(self):  # pragma: no cover - unused
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.apps)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            received = wire(message)
            self.delivered.append(received)
            node = received.metadata.dst_node_id
            reply = self.apps[node](received, self.contexts[node])
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            rnd = int(received.content["config"]["server-round"]) if "config" in received.content else 0
            if not self.drop(node, rnd):
                self._replies[message.metadata.message_id] = wire(reply)
                self.returned.append(wire(reply))  # a copy: the server rewrites its own
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's runtime sets who is sending; instruction messages need it."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def initial_arrays(seed=0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    arrays = {name: (rng.normal(size=shape) * 0.1).astype(np.float32) for name, shape in SHAPES.items()}
    arrays["bn.num_batches_tracked"] = np.array(0, np.int64)
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


class Client:
    """A ClientApp whose 'training' adds a seeded pseudo-gradient step; it keeps what it sent."""

    def __init__(self, node: int, mod: GradzipMod | None, key: str = "arrays"):
        self.node, self.key = node, key  # (key: the ArrayRecord's, FedAvg's arrayrecord_key)
        self.sent: dict[int, dict[str, np.ndarray]] = {}
        self.app = ClientApp(mods=[mod] if mod is not None else [])
        self.app.train()(self.train)
        self.app.evaluate()(self.evaluate)

    def train(self, msg: Message, context: Context) -> Message:
        rnd = int(msg.content["config"]["server-round"])
        rng = np.random.default_rng(1000 * self.node + rnd)
        out = {}
        for name, array in msg.content[self.key].items():
            value = array.numpy()
            if value.dtype.kind == "f":
                direction = np.sign(np.sin(np.arange(value.size) + self.node)).reshape(value.shape)
                value = value - 0.01 * (direction + 0.3 * rng.normal(size=value.shape)).astype(value.dtype)
            else:
                value = np.asarray(value + 1)
            out[name] = np.asarray(value)
        self.sent[rnd] = out
        content = RecordDict({self.key: ArrayRecord({k: Array(v) for k, v in out.items()}),
                              "metrics": MetricRecord({"num-examples": 10 + self.node})})
        return Message(content, reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5, "acc": 0.5})}), reply_to=msg)


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps the (decompressed) replies it aggregates."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: dict[int, dict[int, dict[str, np.ndarray]]] = {}

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen[server_round] = {m.metadata.src_node_id: {k: a.numpy() for k, a in m.content[self.arrayrecord_key].items()}
                                   for m in replies if not m.has_error()}
        return super().aggregate_train(server_round, replies)


def federation(nodes=(11, 22), mod_factory=lambda: GradzipMod(1e-3), drop=None, key="arrays", **fedavg):
    clients = {node: Client(node, mod_factory(), key) for node in nodes}
    grid = LoopbackGrid({node: c.app for node, c in clients.items()}, drop=drop)
    inner = RecordingFedAvg(min_train_nodes=len(nodes), min_available_nodes=len(nodes), arrayrecord_key=key, **fedavg)
    return clients, grid, inner


def run(strategy, grid, rounds, arrays=None):
    return strategy.start(grid=grid, initial_arrays=arrays or initial_arrays(), num_rounds=rounds)


def abs_bound(update: np.ndarray, eb: float) -> float:
    return eb * (float(update.max()) - float(update.min()))


def assert_within_bound(sent, received, base, eb):
    """The server's rebuilt weights are within the bound of the update (plus one rounding)."""
    for name, original in sent.items():
        got = received[name]
        assert got.dtype == original.dtype and got.shape == original.shape, name
        if original.size > 1024 and original.dtype.kind == "f":
            update = original - base[name]
            slack = abs_bound(update, eb) + np.spacing(np.abs(original).max())
            assert np.abs(got.astype(np.float64) - original).max() <= slack, name
        else:
            np.testing.assert_array_equal(got, original, err_msg=name)


# ------------------------------------------------------------------ client Mod on its own


def test_mod_replaces_only_large_float_arrays_and_keeps_dtype_and_shape():
    client = Client(7, GradzipMod(1e-3))
    instruction = Message(RecordDict({"arrays": initial_arrays(), "config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = wire(client.app(wire(instruction), context))
    arrays = reply.content["arrays"]
    assert list(arrays.keys()) == list(SHAPES) + ["bn.num_batches_tracked"]
    for name, shape in SHAPES.items():
        array = arrays[name]
        assert array.dtype == "float32" and tuple(array.shape) == shape
        assert array.stype == (STYPE_GRZ if np.prod(shape) > 1024 else "numpy.ndarray"), name
    assert arrays["bn.num_batches_tracked"].stype == "numpy.ndarray"
    info = reply.content[CONFIG_KEY]
    assert info["codec"] == "gradzip" and list(info["arrays/names"]) == ["conv.weight", "fc.weight"]
    assert info["wire-bytes"] < info["raw-bytes"] / 3
    assert STATE_KEY in context.state  # the client's predictor state lives in its node context


def test_mod_leaves_evaluate_replies_and_errors_alone():
    client = Client(7, GradzipMod(1e-3))
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    instruction = Message(RecordDict({"arrays": initial_arrays(), "config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=7, message_type=MessageType.EVALUATE)
    reply = client.app(instruction, context)
    assert CONFIG_KEY not in reply.content and STATE_KEY not in context.state


def test_mod_rejects_bad_settings():
    with pytest.raises(InputError):
        GradzipMod(2.0, "rel")
    with pytest.raises(InputError):
        GradzipMod(1e-3, codec="zip")


# ------------------------------------------------------------------ full FedAvg rounds


@pytest.mark.parametrize("eb", [1e-2, 1e-4])
def test_fedavg_rounds_decode_within_bound_and_states_stay_identical(eb):
    clients, grid, inner = federation(mod_factory=lambda: GradzipMod(eb))
    strategy = GradzipStrategy(inner)
    arrays = initial_arrays()
    globals_ = {0: {k: a.numpy() for k, a in arrays.items()}}
    result = run(strategy, grid, 4, arrays)
    assert len(strategy.history) == 8 and not any(s.failed or s.reset for s in strategy.history)
    for rnd in range(1, 5):
        for node, client in clients.items():
            base = globals_[rnd - 1]
            assert_within_bound(client.sent[rnd], inner.seen[rnd][node], base, eb)
        # the global model the next round starts from: FedAvg of the decoded replies
        weights = {node: 10 + node for node in clients}
        total = sum(weights.values())
        globals_[rnd] = {name: sum(inner.seen[rnd][n][name] * (w / total) for n, w in weights.items())
                         for name in inner.seen[rnd][11]}
        for node in clients:  # byte-identical predictor states on both ends after every round
            client_state = grid.contexts[node].state[STATE_KEY]["arrays"]
            assert client_state == strategy.state_for(node, "arrays").to_bytes()
    assert strategy.state_for(11, "arrays").round == 4
    final = {k: a.numpy() for k, a in result.arrays.items()}
    for name in SHAPES:
        np.testing.assert_allclose(final[name], globals_[4][name], rtol=0, atol=1e-6)
    stats = strategy.history
    assert all(s.codec == "gradzip" and s.wire_bytes < s.raw_bytes for s in stats)
    assert all(s.compress_seconds > 0 and s.decompress_seconds > 0 for s in stats)


def test_training_instructions_carry_a_per_node_state_ack():
    clients, grid, inner = federation()
    strategy = GradzipStrategy(inner)
    run(strategy, grid, 2)
    round2 = [m for m in grid.delivered
              if m.metadata.message_type == MessageType.TRAIN and m.content["config"]["server-round"] == 2]
    acks = {m.metadata.dst_node_id: m.content[CONFIG_KEY]["digest/arrays"] for m in round2}
    assert len(set(acks.values())) == 2  # each node is told its own state
    # the broadcast itself stays uncompressed
    assert all(a.stype == "numpy.ndarray" for m in round2 for a in m.content["arrays"].values())


def test_sz3_baseline_through_the_same_adapter():
    pytest.importorskip("pysz")
    clients, grid, inner = federation(mod_factory=lambda: GradzipMod(1e-3, codec="sz3"))
    strategy = GradzipStrategy(inner)
    arrays = initial_arrays()
    base = {k: a.numpy() for k, a in arrays.items()}
    run(strategy, grid, 1, arrays)
    assert [s.codec for s in strategy.history] == ["sz3", "sz3"]
    for node, client in clients.items():
        assert_within_bound(client.sent[1], inner.seen[1][node], base, 1e-3)
    train_replies = [m for m in grid.returned if m.metadata.message_type == MessageType.TRAIN]
    assert {a.stype for m in train_replies for a in m.content["arrays"].values()} == {STYPE_SZ3, "numpy.ndarray"}


def test_value_mode_compresses_the_reply_itself():
    clients, grid, inner = federation(mod_factory=lambda: GradzipMod(1e-3, delta=False))
    strategy = GradzipStrategy(inner)
    run(strategy, grid, 2)
    for node, client in clients.items():
        sent = client.sent[2]["fc.weight"]
        bound = abs_bound(sent, 1e-3)
        assert np.abs(inner.seen[2][node]["fc.weight"] - sent).max() <= bound


def test_uncompressed_clients_pass_through_the_wrapper():
    clients, grid, inner = federation(mod_factory=lambda: None)
    strategy = GradzipStrategy(inner)
    run(strategy, grid, 2)
    assert [s.codec for s in strategy.history] == ["none"] * 4
    for node, client in clients.items():
        for name, value in client.sent[2].items():
            np.testing.assert_array_equal(inner.seen[2][node][name], value)


# ------------------------------------------------------------------ missed rounds and restarts


def test_lost_reply_makes_the_client_reset_and_the_server_start_afresh():
    # node 11's round-2 reply is lost: its state advanced, the server's did not
    clients, grid, inner = federation(drop=lambda node, rnd: node == 11 and rnd == 2)
    strategy = GradzipStrategy(inner)
    arrays = initial_arrays()
    run(strategy, grid, 4, arrays)
    by_round = {(s.round, s.node_id): s for s in strategy.history}
    assert (2, 11) not in by_round and not by_round[(2, 22)].reset
    assert by_round[(3, 11)].reset and not by_round[(3, 11)].failed  # said so in the stream
    assert not by_round[(3, 22)].reset
    assert not by_round[(4, 11)].reset  # and carries on predicting from round 3
    assert set(inner.seen[3]) == {11, 22}
    for node in (11, 22):
        assert grid.contexts[node].state[STATE_KEY]["arrays"] == strategy.state_for(node, "arrays").to_bytes()
    assert strategy.state_for(11, "arrays").round == 2  # rounds 3 and 4 since the reset
    assert strategy.state_for(22, "arrays").round == 4


def test_client_that_lost_its_state_resets_and_is_decoded():
    clients, grid, inner = federation()
    strategy = GradzipStrategy(inner)
    arrays = initial_arrays()
    run(strategy, grid, 2, arrays)
    del grid.contexts[22].state[STATE_KEY]  # e.g. the SuperNode restarted
    run(strategy, grid, 1, arrays)
    last = strategy.history[-2:]
    assert {s.node_id: s.reset for s in last} == {11: False, 22: True}
    assert not any(s.failed for s in last)


def test_server_restart_makes_every_client_reset():
    clients, grid, inner = federation()
    run(GradzipStrategy(inner), grid, 2)
    restarted = GradzipStrategy(inner)
    run(restarted, grid, 2)
    assert [s.reset for s in restarted.history] == [True, True, False, False]


def test_undecodable_reply_is_counted_as_a_failure_then_resynchronized():
    """Without the server's ack (e.g. instructions stripped of it) a client cannot notice that
    the server dropped its state; the server turns that reply into an error reply, FedAvg
    aggregates the other one, and the next round the client resets."""
    clients, grid, inner = federation()
    strategy = GradzipStrategy(inner)
    arrays = initial_arrays()
    run(strategy, grid, 2, arrays)
    strategy.reset_node(22)
    original = strategy.configure_train

    def without_ack(*args):
        messages = list(original(*args))
        for m in messages:
            del m.content[CONFIG_KEY]
        return messages

    strategy.configure_train = without_ack
    run(strategy, grid, 1, arrays)
    failed = strategy.history[-1] if strategy.history[-1].node_id == 22 else strategy.history[-2]
    assert failed.failed and "round" in failed.failed
    assert set(inner.seen[1]) == {11}  # aggregated without node 22
    strategy.configure_train = original
    run(strategy, grid, 1, arrays)
    assert {s.node_id: (s.reset, s.failed) for s in strategy.history[-2:]} == {11: (False, ""), 22: (True, "")}


def test_base_model_mismatch_is_refused():
    clients, grid, inner = federation()
    strategy = GradzipStrategy(inner)
    original = strategy.configure_train

    def tampered(*args):
        messages = list(original(*args))
        # the server believes it sent something else to node 22
        other = Message(RecordDict({"arrays": initial_arrays(seed=5)}), dst_node_id=22, message_type=MessageType.TRAIN)
        strategy._sent[22] = other
        return messages

    strategy.configure_train = tampered
    run(strategy, grid, 1)
    failed = [s for s in strategy.history if s.failed]
    assert [s.node_id for s in failed] == [22] and "different model" in failed[0].failed


def test_state_dirs_persist_across_restarts(tmp_path):
    client_dir, server_dir = tmp_path / "clients", tmp_path / "server"
    clients, grid, inner = federation(mod_factory=lambda: GradzipMod(1e-3, state_dir=client_dir))
    arrays = initial_arrays()
    run(GradzipStrategy(inner, state_dir=server_dir), grid, 2, arrays)
    assert sorted(p.name for p in client_dir.glob("*.state")) == ["node-11-arrays.state", "node-22-arrays.state"]
    # a new server process and fresh client contexts: both sides reload their files
    grid.contexts = {node: Context(run_id=2, node_id=node, node_config={}, state=RecordDict(), run_config={})
                     for node in grid.contexts}
    restarted = GradzipStrategy(inner, state_dir=server_dir)
    run(restarted, grid, 1, arrays)
    assert [s.reset for s in restarted.history] == [False, False]
    assert restarted.state_for(11, "arrays").round == 3


@pytest.mark.parametrize("key", ["global model", "w/eights%20ä"])
def test_state_dirs_persist_across_restarts_whatever_the_record_key(tmp_path, key):
    """The server reads each state's key back from its file's name on a restart: a key
    whose characters the names replaced by "_" came back as another key, and every client
    reset (and the server kept announcing the phantom key)."""
    client_dir, server_dir = tmp_path / "clients", tmp_path / "server"
    clients, grid, inner = federation(mod_factory=lambda: GradzipMod(1e-3, state_dir=client_dir), key=key)
    arrays = initial_arrays()
    run(GradzipStrategy(inner, state_dir=server_dir), grid, 2, arrays)
    grid.contexts = {node: Context(run_id=2, node_id=node, node_config={}, state=RecordDict(), run_config={})
                     for node in grid.contexts}
    restarted = GradzipStrategy(inner, state_dir=server_dir)
    run(restarted, grid, 1, arrays)
    assert [s.reset for s in restarted.history] == [False, False]
    assert {k for _, k in restarted._states} == {key}
    assert restarted.state_for(11, key).round == 3


def test_partial_participation_keeps_states_in_step():
    """A client that is not sampled keeps its state; neither side advances."""
    clients, grid, inner = federation(nodes=(11, 22, 33), fraction_train=0.34)
    inner.min_train_nodes = 1
    strategy = GradzipStrategy(inner)
    run(strategy, grid, 6)
    assert not any(s.reset or s.failed for s in strategy.history)
    for node in (11, 22, 33):
        if STATE_KEY in grid.contexts[node].state:
            assert grid.contexts[node].state[STATE_KEY]["arrays"] == strategy.state_for(node, "arrays").to_bytes()
    counts = {node: sum(1 for s in strategy.history if s.node_id == node) for node in (11, 22, 33)}
    assert sum(counts.values()) == 6
    assert all(strategy.state_for(n, "arrays").round == c for n, c in counts.items())



def _drop_head(info):
    del info["arrays/head"]


def _tail_of_another_type(info):
    info["arrays/tail"] = "x"


def _another_wire_version(info):
    info["version"] = 99


def _unknown_codec(info):
    info["codec"] = "zfp"


@pytest.mark.parametrize("tamper, message", [(_drop_head, "KeyError"), (_tail_of_another_type, "TypeError"),
                                             (_another_wire_version, "wire version 99"), (_unknown_codec, "unknown codec")])
def test_a_malformed_gradzip_record_is_an_error_reply_not_a_server_crash(tamper, message):
    # A KeyError or TypeError from a missing or mistyped field ended the whole ServerApp run.
    _, grid, inner = federation()
    strategy = GradzipStrategy(inner)
    pull = grid.pull_messages

    def tampered(ids):
        replies = pull(ids)
        for reply in replies:
            if CONFIG_KEY in reply.content:
                tamper(reply.content[CONFIG_KEY])
        return replies

    grid.pull_messages = tampered
    run(strategy, grid, 2)
    assert strategy.history and all(message in h.failed for h in strategy.history)
