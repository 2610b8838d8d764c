"""A LoRA rank per device profile (``rank:`` in ``--device-profiles``): the run is a mixed-rank
run whose client ranks come from the fleet (``coordinator.fleet.FleetModel.rank``), refused
where ``--client-ranks`` is refused; through the real round loop (``run_virtual``, real
ClientApps on the tiny model), each client trains its profile's rank and the round aggregates
per rank component, as the numpy reference and as ``--client-ranks`` with the same ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cli.main import build_parser
from cli.options import run_overrides
from client import app as client_app
from client.profiles import Fleet, load_profiles
from coordinator.config import ConfigError, RunConfig
from coordinator.progress import Progress
from coordinator.update_wire import RANK_ORDER, UpdateWire
from protocol.messages import decode_train_instruction
from protocol.ranks import RankError
from simulations.engine import NodePartitions
from simulations.fleet import DeviceFleet
from tests.fakegrid import run_virtual
from tests.unit.coordinator.test_compression_rounds import (
    NODES,
    RealFleet,
    _replies_reference,
    adapter_of,
    config,
    run,
)

ROOT = Path(__file__).resolve().parents[3]
MIXED_EXAMPLE = ROOT / "simulations" / "profiles" / "mixed-ranks.yaml"
LINKS = {"tokens_per_second": 10, "uplink_mbps": 1, "downlink_mbps": 1}


@pytest.fixture(autouse=True)
def _fresh_client_processes() -> None:
    client_app.load_resident.cache_clear()
    client_app._LOADED.clear()


def profiles_file(tmp_path: Path, ranks: dict[str, int | None], name: str = "p.yaml") -> str:
    raw = {p: {"share": 1, **LINKS, **({"rank": r} if r else {})} for p, r in ranks.items()}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def from_flags(*flags: str) -> RunConfig:
    return RunConfig.from_mapping(run_overrides(build_parser().parse_args(["simulate", *flags])))


# ------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    ("ranks", "flags", "message"),
    [
        (
            {"a": 4, "b": 8},
            ["--client-ranks", "4,8"],
            "client-ranks: give either client-ranks or a rank in the device profiles",
        ),
        (
            {"a": 4, "b": 16},
            [],
            "device-profiles: {f}: the largest rank 16 (profile 'b') must equal lora-rank 8 (the "
            "global adapter keeps the largest rank); pass --lora-rank 16",
        ),
        (
            {"a": 2, "b": 4},
            [],
            "device-profiles: {f}: the largest rank 4 (profile 'b') must equal lora-rank 8",
        ),
        (
            {"a": 4, "b": 8},
            ["--dp", "client", "--noise-multiplier", "1"],
            "device-profiles: mixed ranks divide each rank component",
        ),
        ({"a": 4, "b": 8}, ["--aggregator", "median"], "device-profiles: 'median' is not"),
        ({"a": 4, "b": 8}, ["--ffa-lora"], "device-profiles: FFA-LoRA freezes A"),
        ({"a": 4, "b": 8}, ["--strategy", "scaffold"], "device-profiles: scaffold's control"),
        (
            {"a": 4, "b": 8},
            ["--rank-aggregation", "flexlora", "--secagg"],
            "rank-aggregation: flexlora averages the clients' products",
        ),
    ],
)
def test_profile_ranks_are_refused_where_client_ranks_are(
    ranks: dict[str, int | None], flags: list[str], message: str, tmp_path: Path
) -> None:
    f = profiles_file(tmp_path, ranks)
    with pytest.raises(ConfigError) as info:
        from_flags("--device-profiles", f, *flags)
    assert message.format(f=f) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_bad_rank_in_the_file_is_a_config_error_naming_file_profile_and_field(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"pi4": {"share": 1, **LINKS, "rank": 0}}))
    with pytest.raises(ConfigError) as info:
        from_flags("--device-profiles", str(path))
    assert str(info.value) == f"{path}: profile 'pi4': rank must be a positive integer, got 0"


def test_what_composes_with_profile_ranks_is_accepted(tmp_path: Path) -> None:
    # a profile without a rank trains lora-rank, so 4 and (unset) make a mixed fleet of 4 and 8
    f = profiles_file(tmp_path, {"a": 4, "b": None})
    for flags in ([], ["--secagg"], ["--rank-aggregation", "flexlora"]):
        cfg = from_flags("--device-profiles", f, *flags)
        assert cfg.mixed_ranks and cfg.profile_ranks() == {"a": 4, "b": 8}
    # no profile sets a rank: not a mixed-rank run, and --client-ranks may be given
    plain = profiles_file(tmp_path, {"a": None, "b": None}, "plain.yaml")
    assert not from_flags("--device-profiles", plain).mixed_ranks
    assert from_flags("--device-profiles", plain, "--client-ranks", "4,8").mixed_ranks
    # the example file: pi4 4, jetson 8, laptop 16, with --lora-rank 16
    cfg = from_flags("--device-profiles", str(MIXED_EXAMPLE), "--lora-rank", "16")
    assert cfg.profile_ranks() == {"jetson": 8, "laptop": 16, "pi4": 4}
    with pytest.raises(ConfigError, match="pass --lora-rank 16"):
        from_flags("--device-profiles", str(MIXED_EXAMPLE))


def test_profile_ranks_need_a_fleet_that_assigns_them(tmp_path: Path) -> None:
    cfg = from_flags("--device-profiles", profiles_file(tmp_path, {"a": 4, "b": 8}))
    with pytest.raises(RankError, match="no simulated fleet to assign them"):
        UpdateWire(cfg)
    wire = UpdateWire(cfg, {1: 4, 2: None, 3: 9}.get)
    assert (wire.holders, wire.rank(1), wire.rank(2)) == (True, 4, 8)
    with pytest.raises(RankError, match=r"rank 9 is not in 1\.\.8"):
        wire.rank(3)


# ----------------------------------------------------------------------- through the rounds


def test_profile_ranks_train_their_slice_and_aggregate_per_component(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # two profiles of ranks 2 and 4 over the three clients: exactly one of rank 2
    f = profiles_file(tmp_path, {"small": 2, "big": 4})
    raw = yaml.safe_load(Path(f).read_text())
    raw["big"]["share"] = 2
    Path(f).write_text(yaml.safe_dump(raw))
    cfg = config(tiny_model_dir, model_cache, out, **{"lora-rank": 4, "device-profiles": f})
    fleet = Fleet.build(load_profiles(f), len(NODES), seed=cfg.seed)
    nodes = NodePartitions({n: i for i, n in enumerate(NODES)})
    nodes.ready.set()
    names = [f"partition-{i}" for i in range(len(NODES))]
    devices = DeviceFleet(fleet, nodes, names, lora_rank=4)
    real = RealFleet(tmp_path / "f", tiny_model_dir, model_cache)
    r = run_virtual(real.grid(), cfg, out, progress=Progress(1, live=False), fleet=devices)[1]
    assert r["status"] == "ok", r.get("reason")

    want = {str(n): fleet.profile(i).rank for i, n in enumerate(NODES)}
    assert sorted(want.values()) == [2, 4, 4]
    assert r["client_ranks"] == want
    assert {c["partition_id"]: c["rank"] for c in r["client_profiles"]} == {
        i: fleet.profile(i).rank for i in range(len(NODES))
    }
    for node, msg, _reply in real.trains(1):
        instr, sent = decode_train_instruction(msg.content)
        rank = want[str(node)]
        assert instr.lora.rank == rank
        assert instr.lora.alpha == pytest.approx(cfg.lora_alpha * rank / 4)
        assert all(v.shape[0 if "lora_A" in k else 1] == rank for k, v in sent.items())

    # the new adapter is the per-component weighted mean of the decoded replies (numpy)
    new, ref, init = adapter_of(out), _replies_reference(real, out, 1, cfg), real.start_adapter(1)
    for k in new:
        np.testing.assert_allclose(new[k], ref[k], rtol=0, atol=1e-6)
    b = next(k for k in new if "lora_B" in k)
    assert np.abs(new[b][:, 2:] - init[b][:, 2:]).max() > 0  # moved by the rank-4 clients only

    # a resumed run gives every client the same rank again, from nothing it saved
    state = json.loads((out / "state.json").read_text())
    assert RANK_ORDER not in state
    real.restart()
    more = config(
        tiny_model_dir, model_cache, out, rounds=2, **{"lora-rank": 4, "device-profiles": f}
    )
    devices = DeviceFleet(fleet, nodes, names, lora_rank=4)
    rows = run_virtual(
        real.grid(), more, out, resume=True, progress=Progress(2, live=False), fleet=devices
    )
    assert rows[2]["status"] == "ok" and rows[2]["client_ranks"] == want

    # ... and exactly what --client-ranks gives with the same ranks (clients ordered by name)
    same = ",".join(str(fleet.profile(i).rank) for i in range(len(NODES)))
    robin_out = tmp_path / "robin"
    robin = RealFleet(tmp_path / "g", tiny_model_dir, model_cache)
    robin_cfg = config(
        tiny_model_dir, model_cache, robin_out, **{"lora-rank": 4, "client-ranks": same}
    )
    assert run(robin, robin_cfg, robin_out)[1]["client_ranks"] == want
    other = adapter_of(robin_out)
    for k in new:
        np.testing.assert_allclose(new[k], other[k], rtol=0, atol=1e-7)
