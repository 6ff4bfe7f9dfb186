"""`collective node` (a volunteer, or a host of several nodes) and `collective broker` (a Mosquitto for a run).

Thin: parse, call `collective.distributed`, render. Each call into the distributed library
sits in one small function (`_preflight`, `_serve`, `_serve_host`, `write_broker_config` and `_start`), so
that a change of its signature is one edit here. Heavy imports wait until a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from collective.cli.common import (
    EXIT_INTERRUPTED,
    add_threads_option,
    model_cache_dir,
    print_error,
    set_threads,
)

if TYPE_CHECKING:
    from collective.distributed.broker import BrokerFiles, BrokerSettings
    from collective.distributed.host import Host
    from collective.distributed.mqtt import BrokerAddress
    from collective.distributed.preflight import PreflightStep
    from collective.distributed.volunteer import Volunteer
    from collective.scenario import Scenario

SayLine = Callable[[str], None]  # one line of the node's progress, for the console


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `node` and `broker` subcommands; each one's --help description is its docstring."""
    node = sub.add_parser(
        "node", help="serve one node, or host several, of a distributed run (a volunteer machine)", description=cmd_node.__doc__
    )
    node.add_argument("--broker", required=True, metavar="URL", help="mqtt://USER:PASSWORD@host:1883 or mqtts://...:8883 (?ca=FILE)")
    node.add_argument("--run", required=True, metavar="RUN_ID", help="the run id: the name of the coordinator's run folder")
    node.add_argument("--node", action="append", default=[], metavar="NODE_ID", help="a node of the scenario to serve (repeat to host several)")
    node.add_argument("--nodes", metavar="A,B,...", help="several nodes to serve in this one process, comma-separated")
    node.add_argument("--claim", type=int, metavar="N", help="serve N nodes that no live process serves yet (the coordinator assigns them)")
    node.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the scenario's device for the model)")
    node.add_argument("--model", metavar="REF", help="load this model reference instead of the scenario's (a local copy)")
    add_threads_option(node)
    node.add_argument(
        "--scenario-timeout", type=seconds_arg, default=600.0, metavar="SECONDS",
        help="seconds to wait for the coordinator to publish the run (> 0)",
    )
    node.add_argument("--preflight-only", action="store_true", help="check the connection step by step, then exit")
    node.set_defaults(func=cmd_node)

    broker = sub.add_parser(
        "broker",
        help="write a Mosquitto configuration (logins, ACLs, packet size, TLS) and start it",
        description=cmd_broker.__doc__,
    )
    broker.add_argument("--config-dir", required=True, type=Path, metavar="DIR")
    broker.add_argument("--scenario", type=Path, help="size max_packet_size from it and create a login per node")
    broker.add_argument("--port", type=int, default=1883)
    broker.add_argument("--bind", default="0.0.0.0", help="listen address (127.0.0.1 for this machine only)")
    broker.add_argument("--hosts", type=Path, metavar="FILE", help="host logins: a YAML mapping login -> the node ids it may serve")
    broker.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD", help="a login (repeat); overrides a generated one")
    broker.add_argument("--anonymous", action="store_true", help="no logins and no ACLs (a closed network only)")
    broker.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for a TLS listener")
    broker.add_argument("--tls-key", type=Path, help="its private key")
    broker.add_argument("--tls-ca", type=Path, help="CA bundle (for client certificates)")
    broker.add_argument("--tls-port", type=int, default=8883)
    broker.add_argument("--mount-dir", type=Path, help="where mosquitto will see DIR (e.g. /mosquitto/config in docker)")
    broker.add_argument("--no-start", action="store_true", help="only write the configuration")
    broker.set_defaults(func=cmd_broker)


def seconds_arg(text: str) -> float:
    """argparse type of --scenario-timeout: a finite number of seconds > 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def cmd_node(args: argparse.Namespace, console: Console) -> int:
    """Join a distributed run through an MQTT broker and serve one node's rounds until the run
    ends. The coordinator (`collective run SCENARIO --bus URL --out runs/RUN_ID`) publishes the
    scenario; this node loads the model the scenario names for it. Several --node, --nodes A,B
    or --claim N make this process a host: one copy per model, all its nodes' rounds batched."""
    from collective.distributed.mqtt import parse_broker_url

    node_ids = _node_ids(args)
    _check_ids(args.run, node_ids)
    set_threads(args.threads)
    address = parse_broker_url(args.broker)
    solo = len(node_ids) == 1 and args.claim is None
    who = node_ids[0] if solo else address.username or "host"

    def report(line: str) -> None:
        console.print(Text(f"[{who}] {line}"), highlight=False, soft_wrap=True)  # text, not markup

    if args.preflight_only:
        _preflight(address, args.run, who, report)
        return 0
    return _serve(args, address, node_ids[0], report) if solo else _serve_host(args, address, node_ids, report)


def _node_ids(args: argparse.Namespace) -> list[str]:
    """The nodes asked for: each --node, then --nodes; none with --claim (the coordinator assigns them)."""
    from collective.distributed.mqtt import DistributedError

    node_ids = list(args.node) + [n.strip() for n in (args.nodes or "").split(",") if n.strip()]
    twice = sorted({n for n in node_ids if node_ids.count(n) > 1})
    if twice:
        raise DistributedError(f"node {', '.join(twice)} is asked for twice (--node/--nodes): name each node once")
    if args.claim is not None:
        if node_ids or args.claim < 1:
            raise DistributedError("--claim N takes N >= 1 nodes the coordinator assigns: give it without --node/--nodes")
    elif not node_ids:
        raise DistributedError("which nodes? --node ID (repeat it), --nodes A,B,... or --claim N")
    return node_ids


def _check_ids(run_id: str, node_ids: list[str]) -> None:
    """--run and --node, checked before any connection is tried."""
    import re

    from collective.distributed.mqtt import DistributedError
    from collective.distributed.protocol import RUN_ID_PATTERN
    from collective.scenario import check_node_id

    if not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise DistributedError(f"--run {run_id!r}: a run id is 1-64 letters, digits, '-' or '_'")
    for node_id in node_ids:
        if not check_node_id(node_id):
            raise DistributedError(f"--node {node_id!r}: a node id is 1-64 letters, digits, '-' or '_'")


def _preflight(address: BrokerAddress, run_id: str, node_id: str, report: SayLine) -> None:
    """The one call into the preflight check: each step's outcome becomes a line."""
    from collective.distributed.preflight import preflight
    from collective.distributed.protocol import Topics

    def step_line(step: PreflightStep) -> None:
        report(f"preflight {step.name}: {step.status} ({step.detail})")

    asyncio.run(preflight(address, Topics(run_id).echo(node_id), report=step_line))


def _serve(args: argparse.Namespace, address: BrokerAddress, node_id: str, report: SayLine) -> int:
    """The one call into the volunteer: serve the node's rounds until the run ends or Ctrl-C."""
    from collective.distributed.volunteer import Volunteer, VolunteerConfig

    config = VolunteerConfig(
        address=address, run_id=args.run, node_id=node_id, device=args.device, model_ref=args.model,
        cache_dir=model_cache_dir(args), scenario_timeout_s=args.scenario_timeout,
    )
    report(f"node {node_id} of run {args.run} via {address.display()}")
    volunteer = Volunteer(config, report)
    return _until_ended(volunteer, "rounds", [volunteer], report)


def _until_ended(
    server: Volunteer | Host, unit: str, volunteers: list[Volunteer], report: SayLine, note: Callable[[], str] = str
) -> int:
    """Serve until the run ends, then say what was served (and `note()`, read then) and what
    was dropped; on Ctrl-C say what was served and that the coordinator was told."""
    try:
        detail = asyncio.run(server.run())
    except KeyboardInterrupt:
        report(f"stopped (Ctrl-C) after {server.rounds_served} {unit}; the coordinator was told it left")
        return EXIT_INTERRUPTED
    report(f"done: {server.rounds_served} {unit} served{note()}; run ended ({detail})")
    dropped = {v.node_id: v.rejections.as_dict() for v in volunteers if v.rejections.total}
    if dropped:
        report(f"dropped envelopes: {dropped}")
    return 0


def _serve_host(args: argparse.Namespace, address: BrokerAddress, node_ids: list[str], report: SayLine) -> int:
    """The one call into the host: serve several nodes (named or claimed) until the run ends or Ctrl-C."""
    from collective.distributed.host import Host, HostConfig

    config = HostConfig(
        address=address, run_id=args.run, node_ids=tuple(node_ids), claim=args.claim or 0, device=args.device,
        model_ref=args.model, cache_dir=model_cache_dir(args), scenario_timeout_s=args.scenario_timeout,
    )
    asked = f"nodes {', '.join(node_ids)}" if node_ids else f"{args.claim} node(s) to claim"
    report(f"host of {asked} of run {args.run} via {address.display()}")
    host = Host(config, report)
    return _until_ended(host, "node rounds", host.volunteers, report, note=lambda: f", {host.backend.copies} model copy(ies)")


# ---------------------------------------------------------------------------- broker


def cmd_broker(args: argparse.Namespace, console: Console) -> int:
    """Write mosquitto.conf, a password file and ACLs into --config-dir, then start mosquitto
    (or say how to start it where it is not installed). With --scenario every node gets a login
    (its node id) with a fresh password, listed in credentials.txt, and may publish only under its
    own topics; so do the coordinator (coordinator) and a read-only watcher (watcher, for
    collective watch --broker). --hosts FILE adds a login per host (`collective node --nodes`)
    that may act for the node ids its entry lists, and only those."""
    from collective.distributed.broker import fresh_passwords, write_broker_config
    from collective.distributed.mqtt import DistributedError
    from collective.scenario import load_scenario

    _check_config_dir(args.config_dir)
    given = _given_logins(args.user)
    scenario = load_scenario(args.scenario) if args.scenario else None
    hosts = _hosts(args, scenario)
    users = {**_logins(args, scenario, given), **fresh_passwords(list(hosts), given)}
    try:
        files = write_broker_config(_broker_settings(args, scenario, users, hosts))
    except OSError as exc:  # e.g. a folder this user may not write
        raise DistributedError(f"--config-dir {args.config_dir}: cannot write the configuration ({exc})") from None
    _say_written(files, users, args.port, console)
    if args.no_start:
        return 0
    return _start(files, console)


def _check_config_dir(folder: Path) -> None:
    """--config-dir is a folder, or can become one: neither it nor a folder above it is a file."""
    from collective.distributed.mqtt import DistributedError

    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == folder else f"is under {path}, which is a file"
                raise DistributedError(f"--config-dir {folder}: {what}; give a folder (it is created when missing)")
            return


def _given_logins(items: list[str]) -> dict[str, str]:
    """Each --user NAME:PASSWORD, by name."""
    from collective.distributed.mqtt import DistributedError
    from collective.scenario import check_node_id

    given: dict[str, str] = {}
    for item in items:
        name, sep, password = item.partition(":")
        if not sep or not name or not password:
            raise DistributedError(f"--user {item!r}: expected NAME:PASSWORD")
        if not check_node_id(name):  # every login is a node id, a host, the coordinator or the watcher
            raise DistributedError(f"--user {name!r}: a login is 1-64 letters, digits, '-' or '_' (no MQTT wildcard '+' or '#', no '/')")
        given[name] = password
    return given


def _logins(args: argparse.Namespace, scenario: Scenario | None, given: dict[str, str]) -> dict[str, str]:
    """The broker's logins: none with --anonymous; else a generated one per scenario node (and
    the coordinator and watcher), each overridden by a --user NAME:PASSWORD."""
    from collective.distributed.broker import users_for
    from collective.distributed.mqtt import DistributedError

    if args.anonymous:
        return {}
    if scenario is None:
        return given
    try:
        return {**users_for(scenario, given), **given}
    except ValueError as exc:
        raise DistributedError(f"{args.scenario}: {exc}") from None


def _hosts(args: argparse.Namespace, scenario: Scenario | None) -> dict[str, list[str]]:
    """--hosts FILE: host login -> its node ids (checked against the scenario's nodes when given)."""
    from collective.distributed.broker import read_hostfile
    from collective.distributed.mqtt import DistributedError

    if args.hosts is None:
        return {}
    if args.anonymous:
        raise DistributedError("--hosts gives logins, --anonymous none: use one of them")
    try:
        return read_hostfile(args.hosts, list(scenario.node_ids) if scenario is not None else None)
    except ValueError as exc:
        raise DistributedError(str(exc)) from None


def _broker_settings(
    args: argparse.Namespace, scenario: Scenario | None, users: dict[str, str], hosts: dict[str, list[str]]
) -> BrokerSettings:
    from collective.distributed.broker import (
        DEFAULT_MAX_PACKET_BYTES,
        BrokerSettings,
        TlsFiles,
        max_packet_size_for,
    )
    from collective.distributed.mqtt import DistributedError

    if (args.tls_cert is None) != (args.tls_key is None):
        raise DistributedError("TLS needs both --tls-cert and --tls-key")
    tls = TlsFiles(args.tls_cert.resolve(), args.tls_key.resolve(), args.tls_ca.resolve() if args.tls_ca else None) if args.tls_cert else None
    return BrokerSettings(
        config_dir=args.config_dir, port=args.port, bind=args.bind, users=users, hosts=hosts,
        max_packet_size=max_packet_size_for(scenario) if scenario is not None else DEFAULT_MAX_PACKET_BYTES,
        tls=tls, tls_port=args.tls_port, mount_dir=args.mount_dir,
        run_as="root" if args.mount_dir is None and hasattr(os, "geteuid") and os.geteuid() == 0 else None,
    )


def _say_written(files: BrokerFiles, users: dict[str, str], port: int, console: Console) -> None:
    """What was written, who may log in, and how the watcher login is used."""
    from collective.distributed.protocol import WATCHER

    console.print(f"wrote {files.conf}" + (f", {files.passwd}, {files.acl}" if files.passwd else ""), highlight=False)
    if files.credentials is not None:
        console.print(f"logins ({len(users)}, passwords in {files.credentials}): {', '.join(users)}", highlight=False, soft_wrap=True)
        if WATCHER in users:
            console.print(
                f"the {WATCHER} login may only read the runs' records: collective watch --broker "
                f"mqtt://{WATCHER}:PASSWORD@HOST:{port} --run RUN_ID",
                highlight=False,
                soft_wrap=True,
            )
    elif not users:
        print_error(console, "no logins: anyone who reaches the port may join (use on a closed network only)", label="warning:", style="yellow")


def _start(files: BrokerFiles, console: Console) -> int:
    """Run mosquitto in the foreground until it exits, Ctrl-C or SIGTERM (passed on to it); where
    it is not installed, say how to start it."""
    from collective.distributed.broker import mosquitto_binary, run_broker, start_instructions

    binary = mosquitto_binary()
    if binary is None:
        console.print(start_instructions(files), highlight=False, soft_wrap=True)
        return 0
    console.print(f"starting {binary} -c {files.conf} (Ctrl-C or SIGTERM stops it)", highlight=False)
    return run_broker(files, binary)
