"""gradzip.torch: state_dict <-> numpy (bfloat16 included), model updates, .pt/.pth loading."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import gradzip  # noqa: E402
from gradzip.errors import InputError  # noqa: E402
from gradzip.tensorio import dtype_name, is_bfloat16, read_tensors, write_tensors  # noqa: E402
from gradzip.torch import (apply_update, load_state_dict_bytes, load_state_dict_file, model_update,  # noqa: E402
                           numpy_to_state_dict, save_state_dict_file, state_dict_to_numpy)


def small_cnn(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    return model.to(dtype)


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_state_dict_round_trip_is_bit_exact(dtype):
    model = small_cnn(dtype)
    arrays = state_dict_to_numpy(model)  # a module or its state_dict
    assert list(arrays) == list(model.state_dict())
    assert arrays["1.num_batches_tracked"].shape == () and arrays["1.num_batches_tracked"].dtype == np.int64
    if dtype == torch.bfloat16:
        assert is_bfloat16(arrays["0.weight"]) and dtype_name(arrays["0.weight"]) == "BF16"
    assert_same_state(numpy_to_state_dict(arrays), model.state_dict())


def test_bfloat16_survives_safetensors_and_gradzip():
    model = small_cnn(torch.bfloat16)
    arrays = state_dict_to_numpy(model)
    back, fmt, _ = read_tensors(write_tensors(arrays, "safetensors"))
    assert fmt == "safetensors"
    assert_same_state(numpy_to_state_dict(back), model.state_dict())
    decoded = gradzip.Decompressor().decompress(gradzip.Compressor(1e-3).compress(arrays))
    restored = numpy_to_state_dict(decoded)
    assert restored["3.weight"].dtype == torch.bfloat16
    weight = model.state_dict()["3.weight"].float()
    bound = 1e-3 * float(weight.max() - weight.min())
    # bf16 reconstruction: within the bound (the core re-checks it in bf16)
    assert float((restored["3.weight"].float() - weight).abs().max()) <= bound


def test_model_update_and_apply_update_are_inverse():
    model = small_cnn()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.state_dict()["1.num_batches_tracked"].add_(3)
    update = model_update(model, global_state)
    assert list(update) == list(global_state)
    assert update["1.num_batches_tracked"] == 3
    expected = (model.state_dict()["0.weight"] - global_state["0.weight"]).numpy()
    np.testing.assert_allclose(update["0.weight"], expected, atol=1e-9)
    rebuilt = apply_update(global_state, update)
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(rebuilt[name], value.numpy(), atol=1e-7, err_msg=name)
    floats = model_update(model, global_state, floats_only=True)
    assert "1.num_batches_tracked" not in floats


def test_model_update_compresses_within_the_bound():
    model = small_cnn()
    global_arrays = state_dict_to_numpy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    update = model_update(model, global_arrays)
    decoded = gradzip.Decompressor().decompress(gradzip.Compressor(1e-3, "rel").compress(update))
    for name, value in update.items():
        if value.dtype.kind == "f":  # small float tensors too: the bundle quantizes them
            bound = 1e-3 * float(value.max() - value.min())
            assert np.abs(decoded[name].astype(np.float64) - value).max() <= bound, name
        else:
            np.testing.assert_array_equal(decoded[name], value)


def test_bfloat16_update():
    model = small_cnn(torch.bfloat16)
    base = state_dict_to_numpy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.full_like(p, 0.5))
    update = model_update(model, base)
    assert is_bfloat16(update["5.weight"])
    back = numpy_to_state_dict(update)["5.weight"].float()
    local, start = model.state_dict()["5.weight"].float(), numpy_to_state_dict(base)["5.weight"].float()
    assert torch.allclose(back, local - start, atol=1e-2, rtol=1e-2)


def test_update_of_mismatched_models_is_refused():
    with pytest.raises(InputError, match="does not match"):
        model_update(small_cnn(), small_cnn(torch.float16))
    other = {k: v for k, v in state_dict_to_numpy(small_cnn()).items() if k != "5.bias"}
    with pytest.raises(InputError, match="not in the global"):
        model_update(small_cnn(), other)


def test_load_pt_file_flattens_nested_tensors(tmp_path):
    model = small_cnn(torch.bfloat16)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "extra": [torch.arange(3)]}, path)
    arrays = load_state_dict_file(path)
    assert list(arrays)[:2] == ["model.0.weight", "model.1.weight"] and "extra.0" in arrays
    assert is_bfloat16(arrays["model.0.weight"])
    assert_same_state(numpy_to_state_dict({k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}),
                      model.state_dict())
    save_state_dict_file(arrays, tmp_path / "again.pt")
    assert list(load_state_dict_file(tmp_path / "again.pt")) == list(arrays)


class Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse to unpickle it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_load_refuses_arbitrary_pickles_and_non_tensors(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "code": Payload()}, evil)
    with pytest.raises(InputError, match="weights_only=True"):
        load_state_dict_file(evil)
    assert "must never run" not in capsys.readouterr().out
    numbers = tmp_path / "numbers.pt"
    torch.save({"w": torch.ones(2), "step": 5}, numbers)
    with pytest.raises(InputError, match="'step' is a int, not a tensor"):
        load_state_dict_file(numbers)
    with pytest.raises(InputError) as refused:  # the file named once, not twice
        read_tensors(numbers.read_bytes(), "numbers.pt")
    assert str(refused.value).count("numbers.pt") == 1
    with pytest.raises(InputError, match="not found"):
        load_state_dict_file(tmp_path / "missing.pt")
    with pytest.raises(InputError):
        load_state_dict_bytes(b"not a torch file", "stdin")


def test_without_torch_the_error_is_clear(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(small_cnn().state_dict(), path)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        from gradzip.torch import load_state_dict_file, torch_available
        from gradzip.errors import InputError
        assert not torch_available()
        try:
            load_state_dict_file({str(path)!r})
        except InputError as exc:
            print("InputError:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "InputError: reading PyTorch files needs torch" in out.stdout
    assert "pip install torch==2.13.0" in out.stdout


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_and_meta_tensors_are_refused_in_one_line(tmp_path, kind):
    """They ended in a torch traceback (a sparse layout has no numpy view, a meta tensor no data)."""
    tensor = torch.randn(10, 10).to_sparse() if kind == "sparse" else torch.empty(100, device="meta")
    path = tmp_path / f"{kind}.pt"
    torch.save({"w": tensor, "ok": torch.ones(3)}, path)
    with pytest.raises(InputError, match="sparse|meta"):
        load_state_dict_file(path)
    with pytest.raises(InputError, match="sparse|meta"):
        read_tensors(path.read_bytes(), str(path))


# ---------------------------------------------------------------- inputs the helpers refuse in one clear error


def test_an_update_for_tensors_the_model_lacks_is_refused():
    """apply_update ignored update entries the model does not have (a DDP "module." prefix):
    the model came back unchanged, without a word. model_update dropped global tensors the
    local model lacks, though it refused the reverse."""
    base = {"w": np.ones(4, np.float32)}
    with pytest.raises(InputError, match="module.w"):
        apply_update(base, {"module.w": np.ones(4, np.float32)})
    with pytest.raises(InputError, match="numpy arrays"):
        apply_update(base, {"w": torch.ones(4)})
    with pytest.raises(InputError, match="'b' is in the global model but not in the local one"):
        model_update({"w": torch.ones(4)}, {"w": torch.zeros(4), "b": torch.zeros(2)})
    assert np.array_equal(apply_update(base, {"w": np.full(4, 2, np.float32)})["w"], np.full(4, 3, np.float32))


def test_names_that_collide_once_made_strings_are_refused():
    with pytest.raises(InputError, match="occurs twice"):
        state_dict_to_numpy({1: torch.ones(2), "1": torch.zeros(2)})


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("make", ["sparse", "meta", "nested"])
def test_tensors_numpy_cannot_hold_are_one_input_error(make):
    """The sparse and meta checks lived only in the .pt reader: state_dict_to_numpy and
    model_update raised torch's TypeError or NotImplementedError, and a nested tensor got
    through the .pt reader to a RuntimeError."""
    tensor = {"sparse": lambda: torch.ones(3, 3).to_sparse(), "meta": lambda: torch.ones(3, device="meta"),
              "nested": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}[make]()
    with pytest.raises(InputError, match="'a'"):
        state_dict_to_numpy({"a": tensor})
    if make != "meta":  # (torch.save of a meta tensor is its own matter)
        buffer = io.BytesIO()
        torch.save({"a": tensor}, buffer)
        with pytest.raises(InputError, match="'a'"):
            load_state_dict_bytes(buffer.getvalue())


def test_numpy_to_state_dict_takes_any_byte_order_and_refuses_what_torch_cannot_hold():
    big = np.arange(4, dtype=">f4")
    assert torch.equal(numpy_to_state_dict({"a": big})["a"], torch.arange(4, dtype=torch.float32))
    with pytest.raises(InputError, match="'s'"):
        numpy_to_state_dict({"s": np.array(["x", "y"])})
