"""Device profiles (client/profiles.py): parsing, assignment by seed, availability, time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.defaults import Quantization
from client.profiles import (
    DeviceProfile,
    Fleet,
    ProfileError,
    assign_profiles,
    available,
    load_profiles,
    parse_profiles,
)
from client.settings import ClientSettings

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "simulations" / "profiles" / "edge-fleet.yaml"


def test_the_example_file_loads() -> None:
    profiles = load_profiles(EXAMPLE)
    assert [p.name for p in profiles] == ["jetson", "laptop", "pi4"]
    pi4 = profiles[2]
    assert pi4.memory == 2 * 2**30 and pi4.tokens_per_second == 8 and pi4.availability == 0.6
    assert pi4.uplink_mbps == 5 and pi4.quantization is Quantization.NF4


def test_json_and_yaml_give_the_same_profiles(tmp_path: Path) -> None:
    raw = {"a": {"share": 1, "tokens_per_second": 10, "uplink_mbps": 1, "downlink_mbps": 2}}
    (tmp_path / "p.json").write_text(json.dumps(raw))
    (tmp_path / "p.yaml").write_text(
        "a:\n  share: 1\n  tokens_per_second: 10\n  uplink_mbps: 1\n  downlink_mbps: 2\n"
    )
    assert load_profiles(tmp_path / "p.json") == load_profiles(tmp_path / "p.yaml")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "expected a mapping of profile names"),
        ({"a": 3}, "profile 'a': expected a mapping of settings"),
        ({"a": {"share": 1, "tokens_per_second": 1, "uplink_mbps": 1}},
         "profile 'a': field 'downlink_mbps' is missing"),
        ({"a": {"share": 1, "tokens_per_second": 0, "uplink_mbps": 1, "downlink_mbps": 1}},
         "profile 'a': tokens_per_second must be > 0.0, got 0"),
        ({"a": {"share": 1, "tokens_per_second": 1, "uplink_mbps": 1, "downlink_mbps": 1,
                "availability": 1.5}}, "profile 'a': availability must be in \\(0, 1\\]"),
        ({"a": {"share": 1, "tokens_per_second": 1, "uplink_mbps": 1, "downlink_mbps": 1,
                "memory": "lots"}}, "profile 'a': memory: expected a size"),
        ({"a": {"share": 1, "tokens_per_second": 1, "uplink_mbps": 1, "downlink_mbps": 1,
                "quantization": "fp8"}}, "profile 'a': quantization: 'fp8' is not one of"),
        ({"a": {"share": 1, "tokens_per_second": 1, "uplink_mbps": 1, "downlink_mbps": 1,
                "cores": 4}}, "profile 'a': unknown field 'cores'"),
        ({"a": {"share": 0, "tokens_per_second": 1, "uplink_mbps": 1, "downlink_mbps": 1}},
         "the shares add up to 0"),
    ],
)  # fmt: skip
def test_bad_profiles_are_refused_naming_the_field(raw: object, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        parse_profiles(raw, "f.yaml")


def test_assignment_is_a_function_of_the_seed_with_exact_shares() -> None:
    a = assign_profiles([0.5, 0.3, 0.2], 1000, seed=7)
    assert np.array_equal(a, assign_profiles([0.5, 0.3, 0.2], 1000, seed=7))
    assert not np.array_equal(a, assign_profiles([0.5, 0.3, 0.2], 1000, seed=8))
    assert np.bincount(a).tolist() == [500, 300, 200]
    # Largest remainders: 10 clients at 0.45/0.45/0.1 -> 4.5, 4.5, 1 -> 5, 4, 1.
    assert np.bincount(assign_profiles([0.45, 0.45, 0.1], 10, seed=0)).tolist() == [5, 4, 1]


def test_availability_is_deterministic_and_has_the_profile_rate() -> None:
    draws = [available(3, 5, c, 0.6) for c in range(20000)]
    assert draws == [available(3, 5, c, 0.6) for c in range(20000)]
    assert abs(np.mean(draws) - 0.6) < 0.02  # 20,000 Bernoulli(0.6): sd 0.0035
    assert draws != [available(3, 6, c, 0.6) for c in range(20000)]  # another round
    assert draws != [available(4, 5, c, 0.6) for c in range(20000)]  # another seed
    assert all(available(3, r, c, 1.0) for r in range(5) for c in range(100))


def test_round_seconds_is_compute_plus_transfer() -> None:
    p = DeviceProfile("pi4", 1.0, tokens_per_second=8, uplink_mbps=5, downlink_mbps=20)
    # 800 tokens at 8/s = 100 s; 10 MB down at 20 Mbit/s = 4 s; 2.5 MB up at 5 Mbit/s = 4 s.
    assert p.round_seconds(800, 10_000_000, 2_500_000) == pytest.approx(108.0)


def test_a_simulated_client_gets_its_profile_quantization_and_memory() -> None:
    fleet = Fleet.build(load_profiles(EXAMPLE), 50, seed=3)
    run = {"device-profiles": str(EXAMPLE), "seed": 3, "quantization": "none",
           "partition-dir": "/tmp/x"}  # fmt: skip
    for pid in range(50):
        profile = fleet.profile(pid)
        s = ClientSettings.resolve({"partition-id": pid, "num-partitions": 50}, run)
        assert s.quantization is (profile.quantization or Quantization.NONE)
        assert s.max_memory == profile.memory


BASE = {"share": 1, "tokens_per_second": 1, "uplink_mbps": 1, "downlink_mbps": 1}


def test_a_profile_may_set_its_lora_rank(tmp_path: Path) -> None:
    a, b, c = parse_profiles(
        {"a": {**BASE, "rank": 4}, "b": BASE, "c": {**BASE, "rank": None}}, "f.yaml"
    )
    assert (a.rank, b.rank, c.rank) == (4, None, None)
    assert a.to_record()["rank"] == 4 and b.to_record()["rank"] is None
    assert Fleet(parse_profiles({"a": {**BASE, "rank": 4}}, "f"), np.zeros(1, int), 0).ranked
    assert not Fleet((b, c), np.zeros(1, int), 0).ranked
    # what a run saves (partitions/profiles.json) reads back as the same profiles
    (tmp_path / "p.json").write_text(json.dumps({p.name: p.to_record() for p in (a, b, c)}))
    assert load_profiles(tmp_path / "p.json") == (a, b, c)
    mixed = load_profiles(ROOT / "simulations" / "profiles" / "mixed-ranks.yaml")
    assert {p.name: p.rank for p in mixed} == {"jetson": 8, "laptop": 16, "pi4": 4}
    assert all(p.rank is None for p in load_profiles(EXAMPLE))  # the README's edge fleet


@pytest.mark.parametrize("bad", [0, -4, 2.5, 4.0, "4", True, [4]])
def test_a_bad_rank_is_refused_naming_file_profile_and_field(bad: object) -> None:
    with pytest.raises(ProfileError) as info:
        parse_profiles({"pi4": {**BASE, "rank": bad}}, "fleet.yaml")
    assert str(info.value) == (
        f"fleet.yaml: profile 'pi4': rank must be a positive integer, got {bad!r}"
    )
