"""Connection checks before joining a run, one step at a time, each with what to do on failure.

DNS (the host resolves), TCP (something listens on the port), TLS (for mqtts://: the
handshake and the certificate), authentication (the broker accepts the MQTT login) and a
publish/subscribe echo (the broker delivers what this client publishes under its own
topic back to it: the ACL lets it publish and read there; skipped for a read-only watcher,
which may publish nowhere). The first failing step stops the check; `PreflightFailed`
carries every step so far for the CLI to show.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiomqtt

from collective.distributed.mqtt import (
    BrokerAddress,
    DistributedError,
    describe_connect_error,
    make_client,
    refusal_kind,
    tls_context,
)

StepName = Literal["DNS", "TCP", "TLS", "authentication", "publish/subscribe echo"]


@dataclass(frozen=True)
class PreflightStep:
    name: StepName
    status: Literal["ok", "failed", "skipped"]
    detail: str
    hint: str = ""


class PreflightFailed(DistributedError):
    def __init__(self, steps: list[PreflightStep]) -> None:
        failed = steps[-1]
        message = f"preflight failed at step {failed.name!r}: {failed.detail}"
        if failed.hint:
            message += f" What to do: {failed.hint}"
        super().__init__(message)
        self.steps = steps


def _dns(address: BrokerAddress) -> PreflightStep:
    try:
        found = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return PreflightStep(
            "DNS",
            "failed",
            f"cannot resolve {address.host!r} ({exc.strerror}).",
            "check the host name's spelling, or use the broker's IP address; inside docker compose "
            "use the service name (broker).",
        )
    addresses = sorted({str(item[4][0]) for item in found})
    return PreflightStep("DNS", "ok", f"{address.host} is {', '.join(addresses[:3])}")


def _tcp(address: BrokerAddress, timeout: float) -> PreflightStep:
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        return PreflightStep(
            "TCP",
            "failed",
            f"nothing listens on {address.host}:{address.port} (connection refused).",
            "start the broker (`collective broker --config-dir DIR` or `docker compose up broker`) "
            "or check the port in the URL (1883 plain, 8883 TLS).",
        )
    except OSError as exc:
        return PreflightStep(
            "TCP",
            "failed",
            f"cannot reach {address.host}:{address.port} ({exc}).",
            "check that the machine is reachable and that no firewall blocks the port.",
        )
    return PreflightStep("TCP", "ok", f"{address.host}:{address.port} accepts connections")


def _tls(address: BrokerAddress, timeout: float) -> PreflightStep:
    if not address.tls:
        return PreflightStep("TLS", "skipped", "plain mqtt:// (use mqtts:// for TLS)")
    try:
        context = tls_context(address)
        with socket.create_connection((address.host, address.port), timeout=timeout) as raw, context.wrap_socket(
            raw, server_hostname=address.host
        ) as secure:
            version = secure.version()
    except ssl.SSLCertVerificationError as exc:
        return PreflightStep(
            "TLS",
            "failed",
            f"the broker's certificate is not trusted ({exc.verify_message}).",
            "pass the CA that signed it: mqtts://host:8883?ca=/path/to/ca.crt "
            "(or ?insecure=1 for a throw-away self-signed test setup).",
        )
    except (ssl.SSLError, OSError) as exc:
        return PreflightStep(
            "TLS",
            "failed",
            f"no TLS handshake with {address.host}:{address.port} ({exc}).",
            "this port may not speak TLS: use mqtt:// for a plain listener, or the broker's TLS port (8883).",
        )
    return PreflightStep("TLS", "ok", f"{version}, certificate trusted" + (" (not checked: insecure=1)" if address.insecure else ""))


async def _login_and_echo(
    address: BrokerAddress, echo_topic: str | None, timeout: float, report: Callable[[PreflightStep], None]
) -> list[PreflightStep]:
    steps: list[PreflightStep] = []

    def add(step: PreflightStep) -> None:
        steps.append(step)
        report(step)

    try:
        async with make_client(address, identifier=f"collective-preflight-{uuid.uuid4().hex[:8]}", timeout=timeout) as client:
            who = f"user {address.username!r}" if address.username else "anonymous"
            add(PreflightStep("authentication", "ok", f"logged in as {who}"))
            if echo_topic is None:  # a read-only client: nothing to echo
                return steps
            nonce = uuid.uuid4().hex
            await client.subscribe(echo_topic, qos=1)
            await client.publish(echo_topic, nonce.encode(), qos=1)

            async def echoed() -> None:
                async for message in client.messages:
                    if message.payload == nonce.encode():
                        return

            try:
                await asyncio.wait_for(echoed(), timeout)
                add(PreflightStep("publish/subscribe echo", "ok", f"{echo_topic} round trip"))
                return steps
            except asyncio.TimeoutError:
                add(
                    PreflightStep(
                        "publish/subscribe echo",
                        "failed",
                        f"the broker accepted the login but did not deliver a message published to {echo_topic} "
                        f"back within {timeout:g} s.",
                        "the broker's ACL probably forbids this user to publish or read there: with "
                        "`collective broker`, a node's username must be its node id (the coordinator's: coordinator).",
                    )
                )
                return steps
    except aiomqtt.MqttError as exc:
        if steps:  # the login worked; the connection broke during the echo
            add(PreflightStep("publish/subscribe echo", "failed", f"the connection broke ({exc}).", "retry; check the broker's log."))
            return steps
        hint = (
            "fix the credentials in the URL."
            if refusal_kind(exc)
            else "check that this port is an MQTT broker (a TLS port needs mqtts://, a plain one mqtt://)."
        )
        add(PreflightStep("authentication", "failed", describe_connect_error(address, exc), hint))
    return steps


async def preflight(
    address: BrokerAddress,
    echo_topic: str | None,
    *,
    timeout: float = 10.0,
    report: Callable[[PreflightStep], None] | None = None,
) -> list[PreflightStep]:
    """Run the checks in order; raise `PreflightFailed` at the first failing step.
    `echo_topic` None: a read-only client, checked up to its login."""
    shown = report or (lambda step: None)
    steps: list[PreflightStep] = []
    checks: list[Callable[[], PreflightStep]] = [
        lambda: _dns(address),
        lambda: _tcp(address, timeout),
        lambda: _tls(address, timeout),
    ]
    for check in checks:
        step = await asyncio.to_thread(check)
        steps.append(step)
        shown(step)
        if step.status == "failed":
            raise PreflightFailed(steps)
    steps += await _login_and_echo(address, echo_topic, timeout, shown)
    if steps[-1].status == "failed":
        raise PreflightFailed(steps)
    return steps
