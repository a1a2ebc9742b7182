"""gradzip's APPFL compressor.

The first group needs only torch: it drives GradzipCompressor the way APPFL's agents do
(ClientAgent.get_parameters -> compress_model(state_dict); ServerAgent._bytes_to_model ->
decompress_model(bytes, nn.Module)). The tests marked `appfl` run against the real `appfl`
package (installed without its heavy dependencies: see docs/integrations.md) and are skipped,
with the reason, when it cannot be imported.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from gradzip.errors import CorruptStreamError, InputError, StateMismatchError  # noqa: E402
from gradzip.integrations.appfl import MAGIC, GradzipCompressor, register  # noqa: E402

CONFIG = {"error_bounding_mode": "REL", "error_bound": 1e-3, "param_cutoff": 1024}


def appfl_compressor_module():
    try:
        import appfl.compressor as module  # needs appfl plus zstd, blosc, omegaconf
        from omegaconf import OmegaConf  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"appfl is not importable ({type(exc).__name__}: {exc}); "
                    "pip install --no-deps appfl && pip install omegaconf zstd blosc")
    return module


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


def local_round(net: nn.Module, step: int) -> OrderedDict:
    """A client's 'training': a seeded step on every float parameter and buffer."""
    generator = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
        net[1].num_batches_tracked.add_(1)
    return OrderedDict((k, v.clone()) for k, v in net.state_dict().items())


def check_within_bound(sent: dict, got: dict, eb: float = 1e-3, cutoff: int = 1024) -> None:
    assert list(got) == list(sent)
    for name, value in sent.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        if value.is_floating_point() and value.numel() > cutoff:  # param_cutoff: exact, as in APPFL
            bound = eb * float(value.max() - value.min())
            assert float((got[name].double() - value.double()).abs().max()) <= bound, name
        else:
            assert torch.equal(got[name], value), name


def test_rounds_as_appfl_agents_call_it():
    client, server = GradzipCompressor(CONFIG), GradzipCompressor(CONFIG)
    net, server_model = model(), model()
    sizes = []
    for step in range(4):
        params = local_round(net, step)
        blob = client.compress_model(params)  # ClientAgent.get_parameters
        assert isinstance(blob, bytes) and blob.startswith(MAGIC)  # no pickle
        got = server.decompress_model(blob, server_model)  # ServerAgent._bytes_to_model
        assert isinstance(got, OrderedDict)
        check_within_bound(params, got)
        sizes.append(len(blob))
    raw = sum(v.numel() * v.element_size() for v in params.values())
    assert max(sizes) < raw / 2
    key = client.client_key
    assert server._server_states[key].to_bytes() == client._client_states[key].to_bytes()


def test_server_keeps_one_state_per_client_key():
    server = GradzipCompressor(CONFIG)
    clients = [GradzipCompressor({**CONFIG, "client_key": f"site-{i}"}) for i in range(3)]
    nets = [model() for _ in clients]
    for step in range(3):
        for i, (client, net) in enumerate(zip(clients, nets)):
            params = local_round(net, 10 * i + step)
            check_within_bound(params, server.decompress_model(client.compress_model(params), nets[0]))
    assert sorted(server._server_states) == ["site-0", "site-1", "site-2"]
    assert all(s.round == 3 for s in server._server_states.values())


def test_mismatch_is_an_error_and_reset_recovers():
    client, server = GradzipCompressor(CONFIG), GradzipCompressor(CONFIG)
    net = model()
    server.decompress_model(client.compress_model(local_round(net, 0)), net)
    client.compress_model(local_round(net, 1))  # this round never reaches the server
    with pytest.raises(StateMismatchError, match=client.client_key):
        server.decompress_model(client.compress_model(local_round(net, 2)), net)
    client.reset()
    params = local_round(net, 3)
    check_within_bound(params, server.decompress_model(client.compress_model(params), net))
    params = local_round(net, 4)  # and continues from there
    check_within_bound(params, server.decompress_model(client.compress_model(params), net))


def test_keyframes_bound_the_damage_of_a_lost_round():
    client, server = GradzipCompressor({**CONFIG, "keyframe_interval": 2}), GradzipCompressor(CONFIG)
    net = model()
    server.decompress_model(client.compress_model(local_round(net, 0)), net)
    client.compress_model(local_round(net, 1))  # lost
    params = local_round(net, 2)  # a keyframe: compressed from a fresh state
    check_within_bound(params, server.decompress_model(client.compress_model(params), net))


def test_nested_and_batched_models():
    client, server = GradzipCompressor(CONFIG), GradzipCompressor(CONFIG)
    nets = [model(), model()]
    for step in range(2):
        primal = local_round(nets[0], step)
        nested = {"primal": primal, "dual": local_round(nets[1], step), "penalty": 0.5}
        got = server.decompress_model(client.compress_model(nested), nets[0])
        assert list(got) == ["primal", "dual", "penalty"] and got["penalty"] == 0.5
        check_within_bound(primal, got["primal"])
        batch = [local_round(nets[0], 100 + step), local_round(nets[1], 200 + step)]
        got = server.decompress_model(client.compress_model(batch, batched=True), nets[0], batched=True)
        for sent, back in zip(batch, got):
            check_within_bound(sent, back)
        batch = {"a": local_round(nets[0], 300 + step), "b": local_round(nets[1], 400 + step)}
        got = server.decompress_model(client.compress_model(batch, batched=True), nets[0], batched=True)
        assert list(got) == ["a", "b"]
        check_within_bound(batch["b"], got["b"])


def test_numpy_models_and_abs_mode():
    client = GradzipCompressor({"error_bounding_mode": "ABS", "error_bound": 1e-4, "param_cutoff": 100})
    server = GradzipCompressor({"error_bounding_mode": "ABS", "error_bound": 1e-4})
    arrays = {"w": np.linspace(-1, 1, 5000, dtype=np.float32), "b": np.ones(50, np.float32)}
    got = server.decompress_model(client.compress_model(arrays))
    assert isinstance(got["w"], np.ndarray) and np.abs(got["w"] - arrays["w"]).max() <= 1e-4
    np.testing.assert_array_equal(got["b"], arrays["b"])


def test_bad_settings_and_bad_streams():
    with pytest.raises(InputError, match="REL or ABS"):
        GradzipCompressor({**CONFIG, "error_bounding_mode": "PW_REL"})
    with pytest.raises(InputError):
        GradzipCompressor({**CONFIG, "error_bound": -1})
    with pytest.raises(InputError, match="not a tensor"):
        GradzipCompressor(CONFIG).compress_model({"w": [1, 2, 3]})
    with pytest.raises(CorruptStreamError, match="magic"):
        GradzipCompressor(CONFIG).decompress_model(b"\x80\x04pickle", model())
    blob = GradzipCompressor(CONFIG).compress_model(local_round(model(), 0))
    with pytest.raises(CorruptStreamError):
        GradzipCompressor(CONFIG).decompress_model(blob[:-10], model())


def test_state_dir_survives_process_restarts(tmp_path):
    config = {**CONFIG, "client_key": "site-a", "state_dir": str(tmp_path)}
    net = model()
    server = GradzipCompressor({**CONFIG, "state_dir": str(tmp_path)})
    server.decompress_model(GradzipCompressor(config).compress_model(local_round(net, 0)), net)
    # new client and server instances (new processes) pick the state up from disk
    params = local_round(net, 1)
    got = GradzipCompressor({**CONFIG, "state_dir": str(tmp_path)}).decompress_model(
        GradzipCompressor(config).compress_model(params), net)
    check_within_bound(params, got)
    assert sorted(p.name for p in tmp_path.glob("*.state")) == ["appfl-client-site-a.state", "appfl-server-site-a.state"]


def test_client_keys_that_differ_only_in_special_characters_keep_their_own_state_files(tmp_path):
    # "site 1", "site_1" and "site/1" once shared one file ("_" for every special character):
    # each restarted client and the server then predicted from whichever client saved last.
    keys = ["site 1", "site_1", "site/1"]
    nets = [model() for _ in keys]
    for step in range(3):  # new instances each round: every state comes from disk
        server = GradzipCompressor({**CONFIG, "state_dir": str(tmp_path)})
        for i, (key, net) in enumerate(zip(keys, nets)):
            params = local_round(net, 10 * i + step)
            client = GradzipCompressor({**CONFIG, "client_key": key, "state_dir": str(tmp_path)})
            check_within_bound(params, server.decompress_model(client.compress_model(params), net))
    assert len(list(tmp_path.glob("appfl-server-*.state"))) == len(keys)
    assert len(list(tmp_path.glob("appfl-client-*.state"))) == len(keys)


@pytest.mark.parametrize("with_state_dir", [False, True])
def test_a_refused_model_leaves_the_client_states_as_they_were(tmp_path, with_state_dir):
    """A model refused after some of its parts were coded (here a later entry that is not a
    JSON value) advanced those parts' client states: every later round then failed on the
    server. Now the states, and their files, change only when the whole call succeeds."""
    config = {**CONFIG, "client_key": "site-a", **({"state_dir": str(tmp_path)} if with_state_dir else {})}
    client, server = GradzipCompressor(config), GradzipCompressor(CONFIG)
    generator = torch.Generator().manual_seed(0)

    def nested(step):
        return {"enc": {"w": torch.randn(64, 64, generator=generator)}, "dec": {"w": torch.randn(48, 48, generator=generator)},
                "step": step}

    server.decompress_model(client.compress_model(nested(0)))
    files = {p.name: p.read_bytes() for p in tmp_path.glob("*.state")}
    states = dict(client._client_states)
    bad = nested(1)
    bad["step"] = float("nan")  # (not a JSON value: refused after both parts are coded)
    with pytest.raises(InputError, match="step"):
        client.compress_model(bad)
    assert client._client_states == states
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.state")} == files
    for step in (1, 2):
        params = nested(step)
        got = server.decompress_model(client.compress_model(params))
        check_within_bound(params["enc"], got["enc"])


# ------------------------------------------------------------------ against the real appfl package


@pytest.mark.appfl
def test_is_an_appfl_compressor_and_registers_by_name():
    module = appfl_compressor_module()
    from appfl.compressor.base_compressor import BaseCompressor
    from appfl.misc.utils import get_appfl_compressor
    from omegaconf import OmegaConf

    assert issubclass(GradzipCompressor, BaseCompressor)
    register()
    assert module.GradzipCompressor is GradzipCompressor
    # the compressor_configs block of an APPFL client/server YAML, as APPFL's agents read it
    config = OmegaConf.create({"enable_compression": True, "lossy_compressor": "GradzipCompressor",
                               "lossless_compressor": "zstd", "error_bounding_mode": "REL", "error_bound": 1e-3,
                               "param_cutoff": 1024})
    client = get_appfl_compressor(compressor_name=config.lossy_compressor, compressor_config=config)
    server = get_appfl_compressor(compressor_name=config.lossy_compressor, compressor_config=config)
    assert isinstance(client, GradzipCompressor) and client.error_bound == 1e-3 and client.mode == "rel"
    net = model()
    for step in range(3):
        params = local_round(net, step)
        check_within_bound(params, server.decompress_model(client.compress_model(params), net))


@pytest.mark.appfl
def test_same_interface_as_appfl_sz3_compressor():
    module = appfl_compressor_module()
    import inspect

    for method in ("compress_model", "decompress_model"):
        ours = list(inspect.signature(getattr(GradzipCompressor, method)).parameters)
        theirs = list(inspect.signature(getattr(module.SZ3Compressor, method)).parameters)
        assert ours == ["self"] + theirs[1:], method
    from omegaconf import OmegaConf

    # APPFL's SZ3 configuration keys configure gradzip the same way
    config = OmegaConf.create({"lossless_compressor": "blosc", "error_bounding_mode": "ABS", "error_bound": 0.01,
                               "param_cutoff": 2048})
    theirs, ours = module.SZ3Compressor(config), GradzipCompressor(config)
    assert ours.param_cutoff == theirs.param_count_threshold == 2048 and ours.mode == "abs"
