"""The result file: the predecessor's reader loads it; keys, shapes, dtypes; npz twin."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch

import nets
from reference import read_result
from igd.engine.attribution import attribute
from igd.output.results import PREDECESSOR_KEYS, decode_torch, encode, encode_npz, encode_torch, result_dict, write_result

N_STEPS = 12


@pytest.fixture(scope="module")
def batch_attribution():
    return attribute(nets.batchnorm_cnn(), nets.images(), [1, 2, 3], n_steps=N_STEPS)


def predecessor_reader(path: Path) -> dict:
    """Exactly the snippet from the predecessor's README, with today's torch.load default."""
    with gzip.open(path, "rb") as fobj:
        x = io.BytesIO(fobj.read())
        return torch.load(x)


def test_file_round_trips_through_the_predecessors_reader(batch_attribution, tmp_path: Path) -> None:
    result = result_dict(batch_attribution, 1, model="test-cnn", target_name="two")
    path = tmp_path / "out.gzip"
    path.write_bytes(encode_torch(result))
    loaded = predecessor_reader(path)
    expected_shapes = {
        "integrated_grads": (1, 3, 16, 16),
        "integrated_directional_grads": (N_STEPS, 3, 16, 16),
        "step_sizes": (N_STEPS, 1),
        "intermediates": (N_STEPS, 3, 16, 16),
        "output": (1, 5),
        "alphas": (N_STEPS,),
        "input": (1, 3, 16, 16),
        "baseline": (1, 3, 16, 16),
        "baseline_output": (1, 5),
    }
    for key, shape in expected_shapes.items():
        assert loaded[key].shape == shape, key
        assert loaded[key].dtype == torch.float32, key
        assert loaded[key].device.type == "cpu"
    assert set(PREDECESSOR_KEYS) <= set(loaded)
    assert loaded["target_class"] == 2 and isinstance(loaded["target_class"], int)
    assert loaded["target_name"] == "two" and loaded["model"] == "test-cnn"
    assert loaded["method"] == "gausslegendre" and loaded["n_steps"] == N_STEPS
    assert loaded["baseline_name"] == "zero"
    assert isinstance(loaded["convergence_delta"], float)
    torch.testing.assert_close(loaded["integrated_grads"][0], batch_attribution.integrated_grads[1])
    torch.testing.assert_close(
        loaded["integrated_directional_grads"], batch_attribution.directional_grads[1]
    )
    torch.testing.assert_close(loaded["output"][0], batch_attribution.logits[1])


def test_one_image_of_a_batch_stores_only_its_own_tensors(batch_attribution) -> None:
    from_batch = read_result(encode_torch(result_dict(batch_attribution, 0)))
    raw = io.BytesIO()
    torch.save(from_batch, raw)
    alone = attribute(nets.batchnorm_cnn(), nets.images()[:1], 1, n_steps=N_STEPS)
    raw_alone = io.BytesIO()
    torch.save(result_dict(alone, 0), raw_alone)
    # torch.save of a view writes its whole storage: a batch of 3 would triple the file.
    assert len(raw.getvalue()) < 1.05 * len(raw_alone.getvalue())


def test_equal_results_encode_to_equal_bytes(batch_attribution) -> None:
    first = encode(result_dict(batch_attribution, 2))
    second = encode(result_dict(batch_attribution, 2))
    assert first == second
    assert decode_torch(first)["target_class"] == 3


def test_npz_has_the_same_keys_and_values(batch_attribution, tmp_path: Path) -> None:
    result = result_dict(batch_attribution, 0, model="m")
    path = tmp_path / "out.npz"
    path.write_bytes(encode_npz(result))
    with np.load(path) as arrays:  # allow_pickle stays False
        assert set(arrays.files) == set(result)
        for key, value in result.items():
            if isinstance(value, torch.Tensor):
                assert arrays[key].shape == tuple(value.shape) and arrays[key].dtype == np.float32
                np.testing.assert_array_equal(arrays[key], value.numpy())
            else:
                assert arrays[key].shape == () and arrays[key].item() == value
    assert encode(result, "npz") == encode_npz(result)


def test_unknown_format_and_index_are_errors(batch_attribution) -> None:
    with pytest.raises(ValueError, match="unknown format 'hdf5'"):
        encode(result_dict(batch_attribution), "hdf5")
    with pytest.raises(IndexError):
        result_dict(batch_attribution, 3)


@pytest.mark.parametrize("fmt", ["torch", "npz"])
def test_streamed_writing_gives_the_same_bytes(fmt: str) -> None:
    """write_result making the path points only when written (Deferred) and freeing each
    large tensor once written gives exactly the bytes of writing everything at once."""
    def fresh():
        return attribute(nets.batchnorm_cnn(), nets.images()[:1], 1, n_steps=400)  # 400 x 3 x 16 x 16 x 4 B > 1 MiB

    whole = io.BytesIO()
    if fmt == "torch":
        torch.save(result_dict(fresh(), 0), whole)
    else:
        whole.write(encode_npz(result_dict(fresh(), 0)))
    streamed = io.BytesIO()
    attribution = fresh()
    write_result(result_dict(attribution, 0, defer_intermediates=True), fmt, 1, streamed, consume=True)
    data = gzip.decompress(streamed.getvalue()) if fmt == "torch" else streamed.getvalue()
    assert data == whole.getvalue()
    if fmt == "torch":  # consumed: its memory is given back as soon as it is written
        assert attribution.directional_grads.untyped_storage().nbytes() == 0
