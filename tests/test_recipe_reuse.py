"""Recipe reuse: between full searches the encoder rebuilds each tensor's last recipe (the
state keeps it, taken from the record on both sides), never at the cost of the bound, the
decoder's state, or a stream a search would have refused."""
from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest

from gradzip import Compressor, Decompressor, GradzipError, InputError
from gradzip.checksum import fingerprint, xxh64
from gradzip.codec import recipe_of
from gradzip.container import split_stream
from gradzip.state import PredictorState
from gradzip.tensorio import read_tensors


@pytest.fixture(scope="module")
def sample(sample_rounds):
    return [read_tensors(path.read_bytes())[0] for path in sample_rounds[:7]]


def _with_recipe(state: PredictorState, recipe) -> PredictorState:
    """A new state (checksummed anew) whose tensors all carry `recipe`, valid or not."""
    tensors = {name: dataclasses.replace(t, recipe=recipe) for name, t in state.tensors.items()}
    return PredictorState(state.round, tensors, state.last_input_digest)


def records(blob: bytes) -> dict[str, dict]:
    return {record["name"]: record for record, _ in split_stream(blob)[1] if record["method"] != "bundle"}


def test_search_every_round_gives_the_searched_records_on_search_rounds(sample):
    """Rounds 0-2 search either way (no history, then the first two with one): their records
    match a compressor that searches every round; a reusing round keeps the last recipe's
    predictor and variant, and can only lose a low-rank part until the next search."""
    every, reusing = Compressor(1e-3, "rel", search_every=1), Compressor(1e-3, "rel", search_every=1000)
    previous = None
    reused_rounds = 0
    for r, tensors in enumerate(sample):
        searched, rebuilt = records(every.compress(tensors)), records(reusing.compress(tensors))
        if r <= 2:
            assert rebuilt == searched
        else:
            for name, record in rebuilt.items():
                recipe, before = recipe_of(record), recipe_of(previous[name])
                assert recipe[:2] == before[:2], name
                assert recipe[2] in (before[2], None), name
            reused_rounds += rebuilt != searched
        previous = rebuilt
    assert reused_rounds  # on real gradients some search picks differ from the reused recipe


def test_states_carry_the_recipes_and_agree_across_a_reusing_sequence(sample, gz):
    compressor, decompressor = Compressor(1e-2, "rel"), Decompressor()
    for tensors in sample:
        blob = compressor.compress(tensors)
        out = decompressor.decompress(blob)
        assert decompressor.state.to_bytes() == compressor.state.to_bytes()
        for name, record in records(blob).items():
            assert compressor.state.tensors[name].recipe == recipe_of(record)
            gz.assert_within_bound(tensors[name], out[name], 1e-2, "rel", name)
    state = compressor.state
    assert any(t.recipe is not None for t in state.tensors.values())
    again = PredictorState.from_bytes(state.to_bytes())
    assert {n: t.recipe for n, t in again.tensors.items()} == {n: t.recipe for n, t in state.tensors.items()}


@pytest.mark.parametrize("recipe", [["bogus", None, None, None], ["linear", "rows,scale_ema", "linear", 16],
                                    ["ema", "kernel", None, None], ["none", None, "values", 5]])
def test_a_recipe_that_does_not_apply_falls_back_to_a_search(sample, gz, recipe):
    """A state's recipe that names no candidate of this tensor (or none this config allows)
    is searched past, not trusted: the stream stays valid and within the bound."""
    compressor = Compressor(1e-3, "rel", search_every=1000, magnitude_prediction=False)
    for tensors in sample[:2]:
        compressor.compress(tensors)
    state = _with_recipe(compressor.state, recipe)
    compressor.state = PredictorState.from_bytes(state.to_bytes())
    blob = compressor.compress(sample[2])
    decompressor = Decompressor(PredictorState.from_bytes(state.to_bytes()))
    out = decompressor.decompress(blob)
    assert decompressor.state.to_bytes() == compressor.state.to_bytes()
    for name, record in records(blob).items():
        assert record["params"].get("predictor") != "bogus"
        gz.assert_within_bound(sample[2][name], out[name], 1e-3, "rel", name)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4"])
def test_search_every_must_be_a_positive_integer(bad):
    with pytest.raises(InputError, match="search_every"):
        Compressor(1e-3, search_every=bad)


@pytest.mark.parametrize("recipe", [[1, None, None, None], ["linear", None], "linear", ["a", "b", 3, None],
                                    ["linear", None, "linear"], ["linear", None, "linear", "16"],
                                    ["linear", None, "linear", True], ["linear", None, "linear", 0],
                                    ["linear", None, "linear", 16.0]])
def test_a_malformed_recipe_in_a_state_file_is_refused(sample, recipe):
    compressor = Compressor(1e-3, "rel")
    compressor.compress(sample[0])
    with pytest.raises(GradzipError, match="malformed"):
        PredictorState.from_bytes(_with_recipe(compressor.state, recipe).to_bytes())


def test_a_version_3_state_file_is_refused_by_name(sample):
    compressor = Compressor(1e-3, "rel")
    compressor.compress(sample[0])
    data = bytearray(compressor.state.to_bytes())
    data[8:12] = (3).to_bytes(4, "little")
    with pytest.raises(GradzipError, match="version 3 is not supported"):
        PredictorState.from_bytes(bytes(data))


def _as_version_4(state: PredictorState) -> bytes:
    """The state as the last release wrote it: version 4, recipes without their rank."""
    head, *arrays = state._parts()
    header_len = int.from_bytes(head[12:20], "little")
    header = json.loads(head[20 : 20 + header_len])
    for entry in header["tensors"]:
        entry["recipe"] = entry["recipe"] and entry["recipe"][:3]
    header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = b"".join([b"GRZSTATE" + struct.pack("<IQ", 4, len(header)) + header, *map(bytes, arrays)])
    return body + fingerprint([body])


def test_a_version_4_state_file_still_loads_and_carries_on(sample, gz):
    """A sidecar written before recipes carried ranks keeps its sequence going: both sides
    load it, rebuild its recipes (no rank hint) and agree on the round after."""
    compressor = Compressor(1e-3, "rel", search_every=1000)
    for tensors in sample[:4]:
        compressor.compress(tensors)
    old = _as_version_4(compressor.state)
    loaded = PredictorState.from_bytes(old)
    assert {n: t.recipe for n, t in loaded.tensors.items()} == {
        n: t.recipe and t.recipe[:3] for n, t in compressor.state.tensors.items()}
    compressor.state = loaded
    blob = compressor.compress(sample[4])
    decompressor = Decompressor(PredictorState.from_bytes(old))
    out = decompressor.decompress(blob)
    assert decompressor.state.to_bytes() == compressor.state.to_bytes()
    for name, record in records(blob).items():
        assert compressor.state.tensors[name].recipe == recipe_of(record)
        assert len(recipe_of(record)) == 4
        gz.assert_within_bound(sample[4][name], out[name], 1e-3, "rel", name)


def _as_version_5(state: PredictorState) -> bytes:
    """The state as the last release wrote it (docs/format.md): version 5, no tensor digests
    in the header, and a fingerprint over the head and each tensor's digest hashed from its
    arrays."""
    head, *arrays = state._parts()
    header_len = int.from_bytes(head[12:20], "little")
    header = json.loads(head[20 : 20 + header_len])
    for entry in header["tensors"]:
        del entry["digest"]
    header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head = b"GRZSTATE" + struct.pack("<IQ", 5, len(header)) + header
    tensor_digests = [fingerprint([bytes(ema), bytes(sign), struct.pack("<QQ", xxh64(bytes(last)), xxh64(bytes(second)))])
                      for ema, sign, last, second in zip(*[iter(arrays)] * 4)]
    return b"".join([head, *map(bytes, arrays)]) + fingerprint([head, *tensor_digests])


def test_a_version_5_state_file_still_loads_checks_its_fingerprint_and_carries_on(sample, gz):
    """A sidecar written before digests were chained keeps its sequence going on both sides,
    and a damaged one is still refused."""
    compressor = Compressor(1e-3, "rel")
    for tensors in sample[:4]:
        compressor.compress(tensors)
    old = _as_version_5(compressor.state)
    loaded = PredictorState.from_bytes(old)
    assert {n: t.recipe for n, t in loaded.tensors.items()} == {n: t.recipe for n, t in compressor.state.tensors.items()}
    damaged = bytearray(old)
    damaged[len(old) // 2] ^= 0x04  # an array byte: only the fingerprint catches it
    with pytest.raises(GradzipError, match="corrupted"):
        PredictorState.from_bytes(bytes(damaged))
    compressor.state = loaded
    blob = compressor.compress(sample[4])
    decompressor = Decompressor(PredictorState.from_bytes(old))
    out = decompressor.decompress(blob)
    assert decompressor.state.to_bytes() == compressor.state.to_bytes()
    assert PredictorState.from_bytes(compressor.state.to_bytes()).digest() == compressor.state.digest()
    for name in out:
        gz.assert_within_bound(sample[4][name], out[name], 1e-3, "rel", name)


def test_cli_search_every(tmp_path, gz, sample_rounds):
    bad = gz.run("compress", str(sample_rounds[0]), "-s", str(tmp_path / "a.state"), "-o", str(tmp_path / "a.grz"),
                         "--search-every", "0")
    gz.assert_cli_error(bad, "search-every")
    assert not (tmp_path / "a.grz").exists() and not (tmp_path / "a.state").exists()
    outputs = {}
    for every in ("1", "1000"):
        out = tmp_path / every
        out.mkdir()
        gz.assert_cli_ok(gz.run("compress", *map(str, sample_rounds[:7]), "-s", str(out / "c.state"), "-o", str(out),
                                        "--search-every", every, "-q"))
        gz.assert_cli_ok(gz.run("decompress", *map(str, sorted(out.glob("*.grz"))), "-s", str(out / "d.state"),
                                        "-o", str(out / "restored"), "-q"))
        assert (out / "c.state").read_bytes() == (out / "d.state").read_bytes()
        outputs[every] = [p.read_bytes() for p in sorted(out.glob("*.grz"))]
    assert outputs["1"] != outputs["1000"]
    assert np.all([len(a) > 0 for a in outputs["1000"]])


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("filters", [32, 1024])
def test_a_rebuilt_recipe_still_competes_with_no_prediction(swap, filters, monkeypatch):
    """Conv kernels of one sign each whose elements keep a magnitude of 0.1 or 2 round after
    round: the EMA shift (kernel sign times the predicted magnitude) is rebuilt where it
    helps, and loses to no prediction in a round that swaps the two magnitudes, where it
    would predict 2 for every 0.1 and 0.1 for every 2. A large layer (1024 filters, 147456
    elements) estimates no prediction on a sample of its rows."""
    from gradzip import codec

    sampled = []
    real_estimate = codec._sampled_none_bytes
    monkeypatch.setattr(codec, "_sampled_none_bytes", lambda values, *rest: sampled.append(values.size) or real_estimate(values, *rest))
    rng = np.random.default_rng(3)
    signs = rng.choice([-1.0, 1.0], size=(filters, 16, 1, 1))
    high = rng.random(size=(filters, 16, 3, 3)) < 0.5
    rounds = []
    for r in range(4):
        magnitude = np.where(high != (swap and r == 3), 2.0, 0.1) * rng.normal(1.0, 0.05, size=high.shape)
        rounds.append({"w": (signs * magnitude).astype(np.float32)})
    compressor = Compressor(1e-2, "rel", search_every=1000)
    for tensors in rounds[:3]:
        compressor.compress(tensors)
    compressor.state = _with_recipe(compressor.state, ["ema", "kernel", None])
    record = records(compressor.compress(rounds[3]))["w"]
    assert record["params"]["predictor"] == ("none" if swap else "ema")
    assert sampled == ([filters * 144] if filters * 144 > codec._SAMPLED_ABOVE else [])


def test_one_round_per_process_gives_the_bytes_of_one_compressor(tmp_path, gz, sample_rounds, sample):
    """The recipes live in the state, so a client that runs `gradzip compress` once per round
    sends what a long-lived Compressor would, through reusing rounds (3-5) and a search (6)."""
    compressor = Compressor(1e-3, "rel")
    expected = []
    for path in sample_rounds[: len(sample)]:
        tensors, fmt, metadata = read_tensors(path.read_bytes())
        expected.append(compressor.compress(tensors, source_format=fmt, metadata=metadata))
    for r, path in enumerate(sample_rounds[: len(sample)]):
        out = tmp_path / f"{r}.grz"
        gz.assert_cli_ok(gz.run("compress", str(path), "-s", str(tmp_path / "c.state"), "-o", str(out), "-q"))
        assert out.read_bytes() == expected[r], f"round {r}"
    assert (tmp_path / "c.state").read_bytes() == compressor.state.to_bytes()


@pytest.mark.parametrize("structured", [True, False])
def test_a_rebuilt_low_rank_part_competes_with_no_prediction_estimated_on_a_sample(structured, monkeypatch):
    """A large layer whose recipe is no prediction plus its values' low-rank part estimates no
    prediction on a sample of its rows and quantizes it whole only where the part loses: a
    round of noise (no part) is coded with no prediction, a low-rank round with the part;
    both decode within the bound."""
    from gradzip import codec

    sampled, whole = [], []
    real_estimate, real_quantize = codec._sampled_none_bytes, codec._quantize
    monkeypatch.setattr(codec, "_sampled_none_bytes", lambda values, *rest: sampled.append(values.size) or real_estimate(values, *rest))

    def quantize(values, dtype, eb, prediction, *rest, **kwargs):
        if prediction is codec._NO_PREDICTION and values.size == 512 * 512:
            whole.append(values.size)
        return real_quantize(values, dtype, eb, prediction, *rest, **kwargs)

    monkeypatch.setattr(codec, "_quantize", quantize)
    rng = np.random.default_rng(11)
    rounds = [{"w": (rng.normal(size=(512, 6)) @ rng.normal(size=(6, 512)) + 0.01 * rng.normal(size=(512, 512))).astype(np.float32)}
              for _ in range(4)]
    if not structured:
        rounds[3] = {"w": rng.normal(size=(512, 512)).astype(np.float32)}
    compressor, decompressor = Compressor(1e-2, "rel", search_every=1000), Decompressor()
    for tensors in rounds[:3]:
        decompressor.decompress(compressor.compress(tensors))
    compressor.state = _with_recipe(compressor.state, ["none", None, "values", 8])
    decompressor.state = compressor.state
    sampled.clear(), whole.clear()
    blob = compressor.compress(rounds[3])
    assert records(blob)["w"]["params"]["predictor"] == ("low_rank" if structured else "none")
    assert sampled == [512 * 512]
    assert whole == ([] if structured else [512 * 512])
    out = decompressor.decompress(blob)["w"]
    bound = 1e-2 * float(np.ptp(rounds[3]["w"]))
    assert np.abs(out.astype(np.float64) - rounds[3]["w"]).max() <= bound
    assert decompressor.state.digest() == compressor.state.digest()


def test_a_state_file_whose_tensor_digest_is_not_16_hex_digits_is_refused(sample):
    """Checked even under a valid checksum: bytes.fromhex alone would take "00 11 22 33 4455"."""
    compressor = Compressor(1e-3, "rel")
    compressor.compress(sample[0])
    head, *arrays = compressor.state._parts()
    header_len = int.from_bytes(head[12:20], "little")
    header = json.loads(head[20 : 20 + header_len])
    for bad in ("00 11 22 33 4455", "0011223344556677aa", "00112233445566zz", 17):
        header["tensors"][0]["digest"] = bad
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        body = b"".join([b"GRZSTATE" + struct.pack("<IQ", 6, len(text)) + text, *map(bytes, arrays)])
        with pytest.raises(GradzipError, match="malformed"):
            PredictorState.from_bytes(body + xxh64(body).to_bytes(8, "little"))


@pytest.mark.parametrize("last_predictor", ["linear", "ema", None])
def test_a_search_after_a_linear_win_skips_the_ema_candidates(sample, monkeypatch, last_predictor):
    """A search tries the EMA shift and the EMA contexts unless the tensor's last recipe was
    linear (they seldom beat it once it has won: docs/design.md); the linear ones it always tries."""
    from gradzip import codec

    compressor = Compressor(1e-2, "rel", search_every=1)
    for tensors in sample[:3]:
        compressor.compress(tensors)
    recipe = None if last_predictor is None else [last_predictor, "kernel" if last_predictor == "ema" else None, None, None]
    compressor.state = _with_recipe(compressor.state, recipe)
    tried = set()
    real = codec._predicted_candidates

    def spy(*args, **kwargs):
        for candidate in real(*args, **kwargs):
            tried.add((candidate.predictor, codec._variant(candidate.side_params)))
            yield candidate

    monkeypatch.setattr(codec, "_predicted_candidates", spy)
    compressor.compress(sample[3])
    assert ("linear", None) in tried
    ema_tried = {("ema", "kernel"), ("context", "ema")} & tried
    assert ema_tried == (set() if last_predictor == "linear" else {("ema", "kernel"), ("context", "ema")}), tried
