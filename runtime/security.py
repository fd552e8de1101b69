"""Who may talk to the service: ZeroMQ CURVE keys, and which endpoints other machines can reach.

CURVE (RFC 26) encrypts every frame and authenticates both ends by their long-term keys. The
server's socket holds its secret key; each client knows the server's public key and holds a
key pair of its own, whose public half must be on the server's allow-list. libzmq asks a ZAP
handler (RFC 27) about every handshake; the service's ``ZapHandler``
(runtime/serve/sources.py) answers from the allow-list. The client and the service both read
their keys here.

Keys are certificate files in pyzmq's format (``zmq.auth.load_certificate`` reads them):
``swapvae keygen curve NAME`` writes ``NAME.key`` (public: give it to the other side) and
``NAME.key_secret`` (both halves, mode 0600). Key files belong outside the repository and the
bundle; the server refuses a secret key file that others can read.

A bind that is not loopback (``is_local``) needs CURVE unless the operator says ``--insecure``;
INFO carries the training details only to peers that are authenticated or local.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from pathlib import Path
from typing import NamedTuple

import zmq
from zmq.auth import load_certificate

_BANNER = "#   ****  Generated on {now} by swapvae keygen  ****\n#   ZeroMQ CURVE {what} Certificate\n#   {note}\n\n"


class CurveKeyError(ValueError):
    """A key file that cannot be used (missing, malformed, or readable by others)."""


class CurveServer(NamedTuple):
    """The server's CURVE key pair (Z85) and the public keys of the clients it lets in."""
    public: bytes
    secret: bytes
    allowed: frozenset

    @classmethod
    def from_files(cls, secret_file: str | Path, allow: str | Path) -> CurveServer:
        public, secret = load_secret(secret_file)
        return cls(public, secret, frozenset(load_allow_list(allow)))


# -- keys ----------------------------------------------------------------------------------------

def _write_cert(path: Path, what: str, note: str, public: bytes, secret: bytes | None, mode: int) -> None:
    text = _BANNER.format(now=datetime.datetime.now().isoformat(timespec="seconds"), what=what, note=note)
    text += f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # never overwrites a key
    with os.fdopen(fd, "w") as f:
        f.write(text)


def generate_curve_keys(stem: str | Path) -> tuple[Path, Path]:
    """Write a new CURVE key pair: ``stem.key_secret`` (mode 0600) and ``stem.key`` (public)."""
    public, secret = zmq.curve_keypair()
    secret_path, public_path = Path(f"{stem}.key_secret"), Path(f"{stem}.key")
    if public_path.exists():
        raise FileExistsError(public_path)
    _write_cert(secret_path, "**Secret**", "Keep it on this machine: never in a bundle, a repository or a message.",
                public, secret, 0o600)
    _write_cert(public_path, "Public", "Give it to the other side (a server's --allow, a client's server key).",
                public, None, 0o644)
    return secret_path, public_path


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a ``.key_secret`` file that only its owner can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise CurveKeyError(f"{path}: cannot read the CURVE secret key ({e.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CurveKeyError(f"{path}: a secret key must be readable by its owner only (chmod 600 {path})")
    public, secret = _load(path)
    if not secret:
        raise CurveKeyError(f"{path}: no secret-key in it (that is a public .key file)")
    return public, secret


def load_public(path: str | Path) -> bytes:
    return _load(Path(path))[0]


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = load_certificate(path)
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"{path}: not a CURVE certificate ({e})") from None
    if not public or len(public) != 40:
        raise CurveKeyError(f"{path}: no 40-character Z85 public-key in it")
    return public, secret


def load_allow_list(where: str | Path) -> set[bytes]:
    """Client public keys: one ``.key`` file, or every ``*.key`` file of a directory."""
    where = Path(where)
    files = sorted(where.glob("*.key")) if where.is_dir() else [where] if where.exists() else []
    if not files:
        raise CurveKeyError(f"{where}: no client public keys (*.key) there")
    return {load_public(f) for f in files}


def key_or_file(value) -> bytes:
    """A Z85 public key given as 40 characters, or the certificate file holding it."""
    if isinstance(value, (bytes, str)) and len(value) == 40 and not os.path.exists(value):
        return value.encode() if isinstance(value, str) else value
    return load_public(value)


def secure_socket(sock: zmq.Socket, public: bytes, secret: bytes) -> None:
    """Make a socket a CURVE server (before it binds): every peer must complete a CURVE
    handshake, which the ZAP handler accepts or refuses."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, b"swapvae")


def client_socket(sock: zmq.Socket, server_public: bytes, public: bytes, secret: bytes) -> None:
    """Make a socket a CURVE client of the server with ``server_public`` (before it connects)."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


# -- endpoints -------------------------------------------------------------------------------------

TRANSPORTS = ("tcp", "ipc", "inproc")  # the ZeroMQ transports the service and its clients use


def check_endpoint(endpoint: str, what: str = "endpoint") -> str:
    """``endpoint`` if it is TRANSPORT://ADDRESS with a transport of ``TRANSPORTS``, else a
    ValueError naming ``what`` (a flag) and showing the form."""
    transport, sep, address = str(endpoint).partition("://")
    if not sep or transport not in TRANSPORTS or not address:
        raise ValueError(f"{what} {endpoint!r} is not a ZeroMQ endpoint: write TRANSPORT://ADDRESS, e.g. "
                         f"tcp://127.0.0.1:5555 (transports: {', '.join(TRANSPORTS)})")
    return endpoint


def is_local(endpoint: str) -> bool:
    """Whether an endpoint reaches this machine only: ipc:// and inproc://, or TCP on a loopback
    address (127.0.0.0/8, ::1, localhost). Anything else (``*``, an interface or host name, another
    address) counts as reachable from elsewhere."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
