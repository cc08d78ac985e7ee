"""FSMoE's grid has exactly its 1458 distinct layers; --config parses or says what is wrong."""

import pytest

from fsmoe_compiler.sim.grid import FSMOE_GRID_AXES, ConfigError, fsmoe_grid, get_grid, parse_config


def test_fsmoe_grid_has_1458_distinct_layers_over_the_documented_axes():
    grid = fsmoe_grid()
    assert len(grid) == 1458
    assert len({s.signature() for s in grid}) == 1458
    assert {s.B for s in grid} == {2, 4, 8}
    assert {s.L for s in grid} == {256, 512, 1024}
    assert {s.M for s in grid} == {1024, 2048, 4096}
    assert {s.H // s.M for s in grid} == {2, 4, 8}
    assert {s.f for s in grid} == {1.2, 2.4, 4.8}
    assert {s.gpus for s in grid} == {16, 32, 48}
    assert {s.ffn for s in grid} == {"gpt", "swiglu"}
    assert all(s.esp == 8 and s.gpus_per_node == 8 for s in grid)
    assert list(FSMOE_GRID_AXES) == ["gpus", "ffn", "B", "L", "M", "HM", "f"]


def test_unknown_grid_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"'tiny'.*fsmoe"):
        get_grid("tiny")


def test_parse_config_reads_a_layer():
    s = parse_config("B=4,L=512,M=2048,H=8192,f=2.4,gpus=32,ffn=gpt")
    assert (s.B, s.L, s.M, s.H, s.f, s.gpus, s.ffn, s.esp) == (4, 512, 2048, 8192, 2.4, 32, "gpt", 8)
    assert parse_config("B=2 L=256 M=1024 f=1.2 HM=8 ffn=swiglu").H == 8192


@pytest.mark.parametrize(
    "text, match",
    [
        ("B=4,L=512", r"missing M, f"),
        ("B=four,L=512,M=2048,f=2.4", r"B='four' is not an integer"),
        ("B=4,L=512,M=2048,f=2.4,ffn=relu", r"ffn='relu'.*gpt, swiglu"),
        ("B=4,L=512,M=2048,f=2.4,experts=8", r"unknown --config key 'experts'.*valid keys: B, L, M"),
        ("B=4,L=512,M=2048,f=2.4,gpus=0", r"gpus must be positive"),
        ("B=4,L512", r"'L512' is not KEY=VALUE"),
        ("", r"empty --config"),
    ],
)
def test_malformed_config_says_what_is_wrong(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(text)
