"""SnapshotState: a published snapshot crosses Ray as raw buffers, tied weights once, and loads back exactly."""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from qcrd_ray.actors.snapshots import SnapshotState, cpu_state_dict


def _tied_t5(seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                               vocab_size=50, tie_word_embeddings=True))


def test_round_trip_keeps_values_dtypes_shapes_and_ties():
    shared = torch.randn(4, 3)
    state = SnapshotState({
        "emb": shared, "lm_head": shared, "half": torch.randn(2, 5).to(torch.bfloat16),
        "count": torch.tensor(7), "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 3),
        "transposed": torch.randn(3, 2).t(),  # not contiguous
    })
    back = pickle.loads(pickle.dumps(state, protocol=5))
    assert isinstance(back, SnapshotState) and list(back) == list(state)
    for key, t in state.items():
        assert back[key].dtype == t.dtype and back[key].shape == t.shape
        assert torch.equal(back[key], t), key
    assert back["emb"] is back["lm_head"]  # one tensor again, as in the model it came from


def test_tied_weights_are_sent_once_as_out_of_band_buffers():
    model = _tied_t5(0)
    state = cpu_state_dict(model)
    unique = {t.untyped_storage().data_ptr(): t.numel() * t.element_size() for t in state.values()}
    assert len(unique) < len(state)  # T5's embedding sits under several keys
    buffers = []
    inline = pickle.dumps(state, protocol=5, buffer_callback=buffers.append)
    assert sum(b.raw().nbytes for b in buffers) == sum(unique.values())
    assert len(inline) < 16_384  # only keys, dtypes and shapes travel in the pickle stream itself


@pytest.mark.ray
def test_snapshot_through_the_object_store_loads_into_a_fresh_student(ray_session):
    ray = ray_session
    source, target = _tied_t5(0), _tied_t5(1)
    state = ray.get(ray.put(cpu_state_dict(source)))
    target.load_state_dict(state)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():  # the loaded model owns its weights: training it leaves the snapshot alone
        target.shared.weight.add_(1.0)
    assert torch.equal(state["shared.weight"], source.shared.weight)
