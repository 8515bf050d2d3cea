"""Ed25519 signatures of bundle manifests, through the ``cryptography`` library.

Keys are PEM files: the private key PKCS#8 (as ``moe-export keygen`` or ``openssl genpkey -algorithm
ed25519`` writes it), the public key SubjectPublicKeyInfo (``openssl pkey -pubout``). A signature is
the 64-byte Ed25519 signature of ``formats.bundle.signed_payload``, stored base64-encoded in
``manifest.sig``; the manifest names the public key by the SHA-256 of its 32 raw bytes, so a wrong
key is told apart from a changed manifest.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from exporter.errors import UserError


def _serialization():
    from cryptography.hazmat.primitives import serialization

    return serialization


def key_id(public_key) -> str:
    """SHA-256 (hex) of an Ed25519 public key's 32 raw bytes."""
    s = _serialization()
    return hashlib.sha256(public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)).hexdigest()


def load_private_key(path: str | Path):
    """The Ed25519 private key of a PEM file; one line for anything else (missing, another key type,
    encrypted)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    hint = "give the private key (moe-export keygen writes it)"
    load = functools.partial(_serialization().load_pem_private_key, password=None)
    return _load_key(path, "signing key", load, Ed25519PrivateKey, b"PUBLIC KEY", hint, "an unencrypted PEM private")


def load_public_key(path: str | Path):
    """The Ed25519 public key of a PEM file; one line for anything else."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    hint = "give the public key (KEY.pub), not the private one"
    load = _serialization().load_pem_public_key
    return _load_key(path, "verification key", load, Ed25519PublicKey, b"PRIVATE KEY", hint, "a PEM public")


def _load_key(path, role: str, load, kind: type, other: bytes, hint: str, what: str):
    """A key of ``kind`` from the PEM file at ``path``; a file holding the ``other`` half gets ``hint``."""
    data = _read(path, role)
    try:
        key = load(data)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} is not {what} key: {hint if other in data else e}") from None
    if not isinstance(key, kind):
        raise UserError(f"{path} holds a {type(key).__name__.removeprefix('_')}, not an Ed25519 key")
    return key


def _read(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"the {what} {path} does not exist")
    if path.stat().st_size > 64 << 10:
        raise UserError(f"{path} is too large to be a {what}")
    return path.read_bytes()


def sign(payload: bytes, private_key) -> bytes:
    """The base64 text (one line) of the Ed25519 signature of ``payload``."""
    return base64.b64encode(private_key.sign(payload)) + b"\n"


def verify(payload: bytes, signature: bytes, key_path: str | Path, recorded_id: str, *, what: str) -> None:
    """Checks a base64 ``signature`` of ``payload`` with the public key in ``key_path``; a user error
    when the signer's recorded key is another one, or the signature does not verify (``what`` changed)."""
    from cryptography.exceptions import InvalidSignature

    public = load_public_key(key_path)
    if key_id(public) != recorded_id:
        raise UserError(
            f"{what} is signed by another key (public key SHA-256 {recorded_id[:16]}...), not by {key_path} "
            f"({key_id(public)[:16]}...); refusing the bundle"
        )
    try:
        public.verify(base64.b64decode(signature.strip(), validate=True), payload)
    except (InvalidSignature, binascii.Error, ValueError):
        raise UserError(
            f"{what} has changed since it was signed (its Ed25519 signature does not verify with {key_path}); "
            "refusing a tampered bundle"
        ) from None


@dataclass
class KeyPair:
    private_key: str
    public_key: str
    key_id: str  # SHA-256 of the public key's raw bytes, as a signed manifest records it

    def to_dict(self) -> dict:
        return asdict(self)


def generate_key_pair(private_path: str | Path, public_path: str | Path) -> KeyPair:
    """Writes a new Ed25519 key pair as PEM files, the private one created readable by its owner only
    (mode 0600 from the start); never replaces an existing file."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from exporter.fileio import check_output

    s = _serialization()
    for path in (private_path, public_path):
        check_output(path)
        if Path(path).exists() or Path(path).is_symlink():
            raise UserError(f"{path} exists; a key is never replaced: choose another name or remove it yourself")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    public = key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    for path, data, mode in ((private_path, private, 0o600), (public_path, public, 0o644)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return KeyPair(str(private_path), str(public_path), key_id(key.public_key()))
