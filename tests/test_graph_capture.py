"""The session's graph-capture cache: one capture per key, shared graphs guarded, copies on request."""

from __future__ import annotations

import pytest
import torch

from graph_capture import captured, fake_world


class _Tiny(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


def test_a_key_is_captured_once_and_the_graphs_are_shared():
    first = captured(_Tiny, 4, inputs=((3, 4),))
    assert captured(_Tiny, 4, inputs=((3, 4),)) is first
    assert captured(_Tiny, 4, inputs=((5, 4),)) is not first  # other inputs, other key
    with fake_world(rank=0, world_size=2):
        assert captured(_Tiny, 4, inputs=((3, 4),)) is not first  # another process group, another key


def test_copies_are_the_callers_and_a_changed_shared_graph_is_named():
    shared = captured(_Tiny, 6, inputs=((3, 6),))
    mine = captured(_Tiny, 6, inputs=((3, 6),), copy=True)
    assert mine.forward[0] is not shared.forward[0] and mine.forward[0].code == shared.forward[0].code
    for n in mine.forward[0].graph.nodes:
        n.meta["fsmoe"] = {"role": "expert"}
    captured(_Tiny, 6, inputs=((3, 6),))  # changing a copy is fine
    node = next(iter(shared.forward[0].graph.nodes))
    node.meta["fsmoe"] = {"role": "expert"}
    try:
        with pytest.raises(AssertionError, match="a test changed the cached graphs of _Tiny"):
            captured(_Tiny, 6, inputs=((3, 6),))
    finally:
        del node.meta["fsmoe"]
