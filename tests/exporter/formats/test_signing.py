"""Ed25519 keys and signatures (exporter.formats.signing): key files, a signature that verifies, and
one line for every way it does not."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from exporter.errors import UserError
from exporter.formats.signing import generate_key_pair, key_id, load_private_key, load_public_key, sign, verify


@pytest.fixture
def keys(tmp_path):
    pair = generate_key_pair(tmp_path / "k", tmp_path / "k.pub")
    return tmp_path / "k", tmp_path / "k.pub", pair.key_id


def test_a_key_pair_is_written_once_the_private_key_its_owners_alone(keys, tmp_path):
    private, public, kid = keys
    assert private.stat().st_mode & 0o777 == 0o600
    assert key_id(load_private_key(private).public_key()) == key_id(load_public_key(public)) == kid
    with pytest.raises(UserError, match="a key is never replaced"):
        generate_key_pair(private, tmp_path / "new.pub")
    assert not (tmp_path / "new.pub").exists()


def test_a_signature_verifies_and_any_change_is_refused(keys, tmp_path):
    private, public, kid = keys
    payload = b'{"files":{}}'
    signature = sign(payload, load_private_key(private))
    verify(payload, signature, public, kid, what="m.json")
    with pytest.raises(UserError, match="m.json has changed since it was signed"):
        verify(payload + b" ", signature, public, kid, what="m.json")
    with pytest.raises(UserError, match="has changed since it was signed"):
        verify(payload, b"not base64 at all!", public, kid, what="m.json")
    other = generate_key_pair(tmp_path / "o", tmp_path / "o.pub")
    with pytest.raises(UserError, match="m.json is signed by another key"):
        verify(payload, signature, tmp_path / "o.pub", kid, what="m.json")
    with pytest.raises(UserError, match="has changed since it was signed"):  # the recorded id is the other's
        verify(payload, signature, tmp_path / "o.pub", other.key_id, what="m.json")


def test_wrong_key_files_get_one_line(keys, tmp_path):
    private, public, _ = keys
    with pytest.raises(UserError, match="give the public key"):
        load_public_key(private)
    with pytest.raises(UserError, match="give the private key"):
        load_private_key(public)
    with pytest.raises(UserError, match="does not exist"):
        load_public_key(tmp_path / "none.pub")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_keys_are_the_same_kind(tmp_path):
    key, pub = tmp_path / "o.key", tmp_path / "o.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], check=True)
    subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub], check=True)
    signature = sign(b"x", load_private_key(key))
    verify(b"x", signature, pub, key_id(load_public_key(pub)), what="x")
