"""The deployment subcommands of ``fedtune``: ``keys``, ``coordinator start|run|nodes`` and
``client start``. Parsing only; each command calls one library function."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

from cli.options import add_run_options, run_overrides

log = logging.getLogger("fedtune")


def add_deploy_commands(sub: Any) -> None:
    _add_keys(sub)
    _add_coordinator(sub)
    _add_client(sub)


# ------------------------------------------------------------------------------ keys


def _add_keys(sub: Any) -> None:
    p = sub.add_parser(
        "keys",
        help="create a CA, the coordinator's TLS certificate and device key pairs",
        description="Create (never overwrite, unless --force) the keys of a deployment in --out: "
        "ca.pem/ca.key, coordinator.pem/.key (SANs: --coordinator-host values plus "
        "localhost, 127.0.0.1, ::1) and nodes/NAME.key/.pub per device.",
    )
    p.add_argument("--out", type=Path, default=Path("fedtune-keys"), help="directory to write")
    p.add_argument(
        "--coordinator-host",
        action="append",
        default=[],
        metavar="HOST",
        help="hostname or IP devices use to reach the coordinator (repeatable)",
    )
    p.add_argument(
        "--device", action="append", default=[], metavar="NAME", help="device name (repeatable)"
    )
    p.add_argument(
        "--devices", type=int, default=0, metavar="N", help="also create device-1 ... device-N"
    )
    p.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    p.add_argument("--force", action="store_true", help="replace files that already exist")
    p.set_defaults(func=cmd_keys, label="keys")


def cmd_keys(args: argparse.Namespace) -> int:
    from protocol.credentials import KeysConfig, create_keys

    if args.devices < 0:
        raise ValueError(f"devices: must be >= 0, got {args.devices}")
    devices = [*args.device, *(f"device-{i}" for i in range(1, args.devices + 1))]
    res = create_keys(
        KeysConfig(
            out_dir=args.out,
            hosts=tuple(args.coordinator_host),
            devices=tuple(devices),
            days=args.days,
            force=args.force,
        )
    )
    for path in res.created:
        print(f"created {path}")
    for path in res.kept:
        print(f"kept    {path}")
    return 0


# ------------------------------------------------------------------------------ coordinator


def _add_coordinator(sub: Any) -> None:
    from coordinator.superlink import DEFAULT_CONTROL_ADDRESS, DEFAULT_FLEET_ADDRESS

    coord = sub.add_parser("coordinator", help="run a coordinator (Flower SuperLink) and runs")
    csub = coord.add_subparsers(dest="coordinator_command", required=True, metavar="ACTION")

    start = csub.add_parser(
        "start",
        help="start the coordinator (TLS and node authentication on by default)",
        description="Start a Flower SuperLink: devices connect to its Fleet API (gRPC), runs "
        "are submitted on its control API (loopback by default).",
    )
    start.add_argument("--keys", type=Path, help="directory from `fedtune keys`")
    start.add_argument("--ca-cert", type=Path, help="CA certificate (instead of --keys)")
    start.add_argument("--cert", type=Path, help="coordinator certificate (instead of --keys)")
    start.add_argument("--key", type=Path, help="coordinator private key (instead of --keys)")
    start.add_argument(
        "--insecure", action="store_true", help="run WITHOUT TLS (testing only; logged loudly)"
    )
    start.add_argument(
        "--authorized-keys",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="device public keys allowed to join: a directory of *.pub files or a file with one "
        "key per line (repeatable). Keys removed here are unregistered at the next start",
    )
    start.add_argument(
        "--no-node-auth",
        action="store_true",
        help="accept any device (no node authentication; logged loudly)",
    )
    start.add_argument(
        "--fleet-address",
        default=DEFAULT_FLEET_ADDRESS,
        help=f"where devices connect (default {DEFAULT_FLEET_ADDRESS})",
    )
    start.add_argument(
        "--control-address",
        default=DEFAULT_CONTROL_ADDRESS,
        help=f"where runs are submitted (default {DEFAULT_CONTROL_ADDRESS}; keep it on loopback)",
    )
    start.add_argument(
        "--state-dir", type=Path, default=None, help="coordinator state (default: user state dir)"
    )
    start.add_argument(
        "--database",
        type=Path,
        default=None,
        help="SuperLink database (default STATE/superlink.db)",
    )
    start.add_argument(
        "--ready-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the SuperLink to come up",
    )
    start.set_defaults(func=cmd_coordinator_start, label="coordinator start")

    run = csub.add_parser(
        "run",
        help="submit a federated fine-tuning run to the coordinator and follow it",
        description="Submit a run to a coordinator started with `fedtune coordinator start`; "
        "streams its progress and writes the same run directory as `fedtune simulate`, on the "
        "coordinator's disk.",
    )
    _add_endpoint_options(run)
    run.add_argument(
        "--poll-interval", type=float, default=2.0, help="seconds between status checks"
    )
    add_run_options(run)
    run.set_defaults(func=cmd_coordinator_run, label="coordinator run")

    nodes = csub.add_parser("nodes", help="list registered devices and whether they are online")
    _add_endpoint_options(nodes)
    nodes.set_defaults(func=cmd_coordinator_nodes, label="coordinator nodes")


def _add_endpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the coordinator's state dir (default: user state dir); finds its control API",
    )
    p.add_argument("--control-address", default=None, help="control API HOST:PORT (overrides)")
    p.add_argument("--root-cert", type=Path, default=None, help="CA certificate (with the above)")
    p.add_argument(
        "--insecure", action="store_true", help="the coordinator runs without TLS (with the above)"
    )


# Options of the simulated fleet that mean nothing to a deployment.
SIMULATION_ONLY = (
    "cpus-per-client",
    "gpus-per-client",
    "client-data-cache",
    "ray-address",
    "device-profiles",
)


def _endpoint(args: argparse.Namespace) -> Any:
    from coordinator.superlink import ControlEndpoint, default_coordinator_dir

    if args.control_address:
        if not args.insecure and args.root_cert is None:
            raise ValueError("--control-address needs --root-cert (or --insecure)")
        return ControlEndpoint(args.control_address, args.root_cert, args.insecure)
    return ControlEndpoint.from_state_dir(args.state_dir or default_coordinator_dir())


def cmd_coordinator_start(args: argparse.Namespace) -> int:
    from coordinator.superlink import CoordinatorConfig, default_coordinator_dir, start

    kw: dict[str, Any] = {
        "state_dir": args.state_dir or default_coordinator_dir(),
        "insecure": args.insecure,
        "authorized_keys": tuple(args.authorized_keys),
        "node_auth": not args.no_node_auth,
        "fleet_address": args.fleet_address,
        "control_address": args.control_address,
        "database": args.database,
        "ready_timeout": args.ready_timeout,
        "verbose": args.verbose,
    }
    if args.keys:
        if any((args.ca_cert, args.cert, args.key)):
            raise ValueError("--keys and --ca-cert/--cert/--key were both given; choose one")
        cfg = CoordinatorConfig.from_keys_dir(args.keys, **kw)
    else:
        cfg = CoordinatorConfig(ca_cert=args.ca_cert, cert=args.cert, key=args.key, **kw)
    return start(cfg)


def cmd_coordinator_run(args: argparse.Namespace) -> int:
    from client.model import (
        Quantization,
        check_lora_targets,
        check_model_file,
        default_cache_dir,
        ensure_base,
        prepare,
        resolve_model,
        weight_module_names,
    )
    from coordinator.config import RunConfig, resolve_output_dir
    from coordinator.rundir import check_new_output_dir
    from coordinator.submit import SubmitConfig, run_summary, submit

    endpoint = _endpoint(args)
    overrides = run_overrides(args)
    if overrides.get("client-quantization"):
        raise ValueError(
            "client-quantization: applies to simulated fleets; in a deployment each device "
            "chooses with `fedtune client start --quantization`"
        )
    if overrides.get("eval-task"):  # read by the ServerApp on this (the coordinator's) machine
        overrides["eval-task"] = str(Path(overrides["eval-task"]).expanduser().resolve())
    if overrides.get("client-max-memory"):
        raise ValueError(
            "client-max-memory: applies to simulated fleets; in a deployment each device "
            "sets its own with `fedtune client start --max-memory`"
        )
    for key in SIMULATION_ONLY:
        if overrides.get(key):
            raise ValueError(f"{key}: applies to `fedtune simulate` only")
    cfg = RunConfig.from_mapping(overrides)
    out = resolve_output_dir(cfg).expanduser().resolve()
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    cfg = RunConfig.from_mapping(
        {**overrides, "output-dir": str(out), "cache-dir": str(cache.resolve())}
    )
    # Fail here, in one line, on what the coordinator would only find out after starting; the
    # checks that write nothing first, then the model cache (nothing is written to the run).
    check_new_output_dir(out)
    if cfg.central_eval_data:
        from client.data import load_records, to_conversations

        to_conversations(load_records(cfg.central_eval_data), cfg.central_eval_data)
    source = resolve_model(cfg.model)
    check_model_file(source)
    log.info("preparing model %s (%s) in cache %s", source.label, cfg.quantization.value, cache)
    prepare(source, [Quantization.NONE, cfg.quantization], cache)
    check_lora_targets(weight_module_names(ensure_base(source, cache)), cfg.lora)
    from cli.tasks import check_eval_task

    check_eval_task(cfg)  # every row of --eval-task checked before the run starts
    sink = _quiet_sink if args.quiet else None
    submit(SubmitConfig(run=cfg, endpoint=endpoint, poll_interval=args.poll_interval,
                        verbose=args.verbose), sink=sink)  # fmt: skip
    print(f"run directory: {out}")
    _name_nodes(endpoint, out)
    s = run_summary(out)
    if s and s["eval_loss_final"] is not None and s["eval_loss_round0"] is not None:
        print(
            f"held-out loss (clients): round 0 {s['eval_loss_round0']:.4f} -> round "
            f"{s['rounds']} {s['eval_loss_final']:.4f}"
        )
    return 0


# Progress lines of the ServerApp ("round 2/5 train: client ...", "round 2/5: train_loss ...").
_PROGRESS_LINE = re.compile(r"round \d+/\d+( \S+)*: (waiting for|client |train_loss )")


def _quiet_sink(line: str) -> None:
    """--quiet: the run's log without its progress lines (warnings and errors stay)."""
    if not _PROGRESS_LINE.search(line):
        print(line, file=sys.stderr, flush=True)


def _name_nodes(endpoint: Any, run_dir: Path) -> None:
    """Record the devices' names (node id -> name, from the coordinator) in the run's
    config.json and rewrite its report, so participation and failures show names, not ids.
    Only when the run directory is on this machine."""
    if not (run_dir / "metrics.jsonl").is_file():
        return
    from coordinator.report import write_run_report
    from coordinator.rundir import RunDirectory
    from coordinator.superlink import list_nodes

    try:
        names = {str(n["node_id"]): n["name"] for n in list_nodes(endpoint) if n.get("name")}
    except Exception as exc:  # the run is done; names are a nicety
        log.warning("could not read the devices' names from the coordinator: %s", exc)
        return
    if names:
        RunDirectory(run_dir).update_config("node_names", names)
        write_run_report(run_dir)


def cmd_coordinator_nodes(args: argparse.Namespace) -> int:
    from coordinator.superlink import list_nodes

    nodes = list_nodes(_endpoint(args))
    if not nodes:
        print("no devices registered")
    for n in nodes:
        print(f"{n['node_id']:>20}  {n['status']:<12} {n['name']}")
    return 0


# ------------------------------------------------------------------------------ client


def _add_client(sub: Any) -> None:
    client = sub.add_parser("client", help="run this device as a client of a coordinator")
    csub = client.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    p = csub.add_parser(
        "start",
        help="join a coordinator and train on this device's data when asked",
        description="Start a Flower SuperNode for this device, with a long-lived worker that "
        "keeps the model in memory. Settings come from flags or a TOML file (--config); "
        "flags win.",
    )
    p.add_argument("--config", type=Path, default=None, help="TOML file with the settings below")
    from client.device import add_flags

    add_flags(p)
    p.set_defaults(func=cmd_client_start, label="client start")


def cmd_client_start(args: argparse.Namespace) -> int:
    from client.device import build_config, flags_given, start

    flags = {**flags_given(args), "verbose": args.verbose or None}
    return start(build_config(args.config, flags))
