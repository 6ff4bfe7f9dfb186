"""MQTT client helpers: broker URLs, TLS, TCP_NODELAY, and what a connection error means.

A broker URL is `mqtt://[user[:password]@]host[:port][?options]` (port 1883) or
`mqtts://...` (TLS, port 8883). Options: `ca=FILE` (trust this CA instead of the system
store), `cert=FILE&key=FILE` (a client certificate), `insecure=1` (do not check the
server's name: self-signed test setups only), and, for the coordinator, `deadline=SECONDS`
(the per-round deadline). Every client sets TCP_NODELAY: the bus sends many small
envelopes, and Nagle's algorithm would hold each one back for up to 40 ms.
"""

from __future__ import annotations

import socket
import ssl
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

import aiomqtt

from collective.run.prepared import RunError

ADDRESS_OPTIONS = ("ca", "cert", "key", "insecure")
PENDING_PUBLISHES_QUIET = 1 << 20  # concurrent QoS 1 publishes before aiomqtt warns (see make_client)
KEEPALIVE_S = 20  # a silent client is dropped after 1.5x this, and its last will published


class DistributedError(RunError):
    """A distributed run cannot start or go on; the message says what to do."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    options: tuple[tuple[str, str], ...] = ()  # what the URL says beyond the address (deadline=...)

    def display(self) -> str:
        """The URL without the password, for messages and logs."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"

    def option(self, name: str) -> str | None:
        return dict(self.options).get(name)

    def with_username(self, username: str | None, password: str | None) -> BrokerAddress:
        from dataclasses import replace

        return replace(self, username=username, password=password)


def parse_broker_url(url: str, allowed_options: tuple[str, ...] = ()) -> BrokerAddress:
    """`mqtt://user:pass@host:1883?ca=...` -> BrokerAddress; a bad URL is a DistributedError."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise DistributedError(
            f"broker URL {url!r}: expected mqtt://[user:password@]host[:port] or mqtts://... (TLS)"
        )
    if not parts.hostname:
        raise DistributedError(f"broker URL {url!r} names no host (try mqtt://127.0.0.1:1883)")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise DistributedError(f"broker URL {url!r}: the port is not a number from 1 to 65535") from None
    options = parse_qsl(parts.query, keep_blank_values=True)
    known = ADDRESS_OPTIONS + allowed_options
    for name, _ in options:
        if name not in known:
            raise DistributedError(f"broker URL {url!r}: unknown option {name!r} (known: {', '.join(known)})")
    given = dict(options)
    if ("cert" in given) != ("key" in given):
        raise DistributedError(f"broker URL {url!r}: a client certificate needs both cert=FILE and key=FILE")
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ca_file=given.get("ca"),
        cert_file=given.get("cert"),
        key_file=given.get("key"),
        insecure=given.get("insecure", "0").lower() in ("1", "true", "yes"),
        options=tuple((k, v) for k, v in options if k in allowed_options),
    )


def tls_context(address: BrokerAddress) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=address.ca_file)
    if address.cert_file and address.key_file:
        context.load_cert_chain(address.cert_file, address.key_file)
    if address.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def client_id(role: str) -> str:
    """A unique MQTT client id (a broker disconnects an older client with the same id)."""
    return f"collective-{role}-{uuid.uuid4().hex[:8]}"[:64]


def make_client(
    address: BrokerAddress,
    *,
    identifier: str,
    will: aiomqtt.Will | None = None,
    timeout: float = 10.0,
) -> aiomqtt.Client:
    """An aiomqtt client for `address` with TCP_NODELAY (and TLS for mqtts://)."""
    client = aiomqtt.Client(
        address.host,
        address.port,
        username=address.username,
        password=address.password,
        identifier=identifier,
        will=will,
        clean_session=True,
        keepalive=KEEPALIVE_S,
        timeout=timeout,
        tls_context=tls_context(address) if address.tls else None,
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )
    # a coordinator sends a round's requests to all its nodes at once: aiomqtt's warning
    # above 10 pending publishes would log a line per node and round
    client.pending_calls_threshold = PENDING_PUBLISHES_QUIET
    return client


def refusal_kind(exc: BaseException) -> str | None:
    """'credentials' or 'not_authorized' when the broker refused the login, else None."""
    if not isinstance(exc, aiomqtt.MqttCodeError):
        return None
    rc = exc.rc
    value = getattr(rc, "value", rc)
    text = str(rc).lower()
    if value in (4, 134) or "password" in text:
        return "credentials"
    if value in (5, 135) or "not auth" in text:
        return "not_authorized"
    return None


def describe_connect_error(address: BrokerAddress, exc: BaseException) -> str:
    """One sentence on why connecting to the broker failed, and what to try."""
    kind = refusal_kind(exc)
    who = f"user {address.username!r}" if address.username else "an anonymous client"
    if kind == "credentials":
        return (
            f"the broker at {address.display()} refused the login of {who}: bad username or password. "
            "Check the user and password in the URL (mqtt://USER:PASSWORD@host); with `collective broker` "
            "a node's username is its node id (a read-only watcher's: watcher) and the passwords are in the "
            "config folder's credentials file."
        )
    if kind == "not_authorized":
        if address.username:
            return (
                f"the broker at {address.display()} refused the login of {who} (not authorized): the password is "
                "wrong, or the broker's password file has no such user. Check USER:PASSWORD in the URL; with "
                "`collective broker` a node's username is its node id (a read-only watcher's: watcher) and the "
                "passwords are in the config folder's credentials.txt."
            )
        return (
            f"the broker at {address.display()} refuses anonymous clients: put USER:PASSWORD@ in the URL "
            "(mqtt://USER:PASSWORD@host:1883)."
        )
    return f"could not talk to the broker at {address.display()}: {exc}"
