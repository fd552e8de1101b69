"""Reading a bundle safely: what the engine runs is exactly what was exported, and signed.

A bundle is a directory of plain files: ``manifest.json`` (schemas/manifest.py), the ONNX
graphs it lists with their sha256, and optionally ``manifest.sig``, an Ed25519 signature of
the manifest's exact bytes (``swapvae export --sign KEY``). The hashes catch accidents; the
signature catches edits, since whoever edits a graph can edit its hash too but cannot sign
without the private key. A server started with ``--trust PUBKEY`` refuses a bundle that is
unsigned or signed by any other key.

Always refused: a file of the bundle that is a symbolic link or not a regular file (the
bundle directory itself may be a link, e.g. ``current -> v2`` for atomic upgrades: it is
resolved once), a name with a directory in it (the manifest's schema allows plain names
only), a hash mismatch, a manifest that fails its schema.

Keys are PEM files (PKCS #8 private, SubjectPublicKeyInfo public), as openssl writes them:
``swapvae keygen sign NAME`` writes NAME.key (mode 0600) and NAME.pub. Never put a private
key in a bundle or a repository.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

from pydantic import ValidationError

from swapvae.schemas.manifest import MANIFEST, BundleManifest

SIGNATURE = "manifest.sig"


class BundleError(ValueError):
    """A bundle that cannot be served: missing files, a bad manifest, a hash or signature mismatch."""


def read_plain(root: Path, name: str) -> bytes:
    """The bytes of ``root/name``, refusing links and anything but a regular file."""
    path = root / name
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise BundleError(f"{root}: {name} is missing") from None
    except OSError as e:  # ELOOP: a symbolic link
        raise BundleError(f"{root}: {name} is a symbolic link or unreadable ({e.strerror}); a bundle holds plain "
                          f"files only") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{root}: {name} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _manifest_bytes(bundle_dir: str | Path) -> tuple[Path, bytes]:
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory (no such directory)")
    root = root.resolve()
    if not os.path.lexists(root / MANIFEST):
        raise BundleError(f"{root}: no {MANIFEST} (is this a bundle written by 'swapvae export'?)")
    return root, read_plain(root, MANIFEST)


def _parse_manifest(root: Path, raw: bytes) -> BundleManifest:
    try:
        return BundleManifest.model_validate_json(raw)
    except ValidationError as e:
        raise BundleError(f"{root / MANIFEST}: invalid manifest: {e}") from None


def read_manifest(bundle_dir: str | Path) -> BundleManifest:
    """A bundle's manifest, validated against its schema (BundleError naming the problem);
    the files it lists are not read: ``load_bundle`` checks them."""
    return _parse_manifest(*_manifest_bytes(bundle_dir))


def load_bundle(bundle_dir: str | Path, trusted: list | None = None) -> tuple[BundleManifest, dict[str, bytes]]:
    """Validate a bundle and return its manifest and the verified file contents (so what runs
    is exactly what was hashed). ``trusted``: public keys (``load_public_key``) of which one
    must have signed the manifest; None accepts an unsigned bundle."""
    root, raw = _manifest_bytes(bundle_dir)
    if trusted is not None:
        verify_signature(root, raw, trusted)
    manifest = _parse_manifest(root, raw)
    blobs = {}
    for name, digest in manifest.files.items():
        if not os.path.lexists(root / name):
            raise BundleError(f"{root}: {name} is listed in the manifest but missing")
        blob = read_plain(root, name)
        if hashlib.sha256(blob).hexdigest() != digest:
            raise BundleError(f"{root}: {name} does not match its sha256 in the manifest (modified or corrupt)")
        blobs[name] = blob
    return manifest, blobs


# -- signatures ---------------------------------------------------------------------------------
def _crypto():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def key_id(public_key) -> str:
    """A short fingerprint: sha256 of the raw public key, hex, first 16 digits."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: str | Path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, OSError) as e:
        raise BundleError(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 public key")
    return key


def load_private_key(path: str | Path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as e:
        raise BundleError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{path}: not an Ed25519 private key")
    return key


def generate_signing_key(stem: str | Path) -> tuple[Path, Path]:
    """Write a new key pair: ``stem.key`` (private, mode 0600, never overwritten) and ``stem.pub``."""
    serialization, ed25519 = _crypto()
    private, public = Path(f"{stem}.key"), Path(f"{stem}.pub")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # refuses to overwrite a key
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def sign_manifest(raw: bytes, private_key) -> bytes:
    """The contents of ``manifest.sig`` for the manifest bytes ``raw``."""
    return json.dumps({"algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
                       "signature": base64.b64encode(private_key.sign(raw)).decode()}).encode()


def verify_signature(root: Path, raw: bytes, trusted: list) -> None:
    from cryptography.exceptions import InvalidSignature

    if not trusted:
        raise BundleError("no trusted public key given")
    try:
        sig = json.loads(read_plain(root, SIGNATURE))
        signature = base64.b64decode(sig["signature"], validate=True)
    except BundleError:
        raise BundleError(f"{root}: unsigned ({SIGNATURE} is missing or not a plain file) and a trusted key is "
                          f"required") from None
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{root}: {SIGNATURE} is malformed ({e})") from None
    for key in trusted:
        try:
            key.verify(signature, raw)
            return
        except InvalidSignature:
            continue
    raise BundleError(f"{root}: the manifest's signature (key {sig.get('key_id')}) does not verify with any trusted "
                      f"key ({', '.join(key_id(k) for k in trusted)}): edited, or signed by another key")
