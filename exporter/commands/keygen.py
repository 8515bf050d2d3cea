"""``moe-export keygen``: an Ed25519 key pair to sign deploy bundles."""

from __future__ import annotations

import click

from exporter.commands.console import console, emit, escape
from exporter.commands.options import json_option, output_option


@click.command()
@output_option("-o", "--output", "private_key", required=True, help="The private key to write (PEM, mode 0600).")
@output_option("--public", "public_key", help="The public key to write (PEM). Default: OUTPUT.pub.")
@json_option("the key files and the public key's SHA-256")
def keygen(private_key, public_key, json_out):
    """Make an Ed25519 key pair for signing deploy bundles.

    Sign on the build machine with the private key (build bundle --sign-key KEY); check on the target
    with the public key (validate or build engine --verify-key KEY.pub), which refuses an unsigned
    bundle, one changed after signing and one signed by another key. Keep the private key like an SSH
    key. An existing file is never replaced. The keys are PKCS#8 / SubjectPublicKeyInfo PEM, the
    same as `openssl genpkey -algorithm ed25519 -out KEY` and `openssl pkey -in KEY -pubout -out KEY.pub`.

    \b
    Example:
      moe-export keygen -o signing.key
      moe-export build bundle --model vmoe-tiny --sign-key signing.key -o tiny-bundle
      moe-export validate tiny-bundle --verify-key signing.key.pub
    """
    from exporter.formats.signing import generate_key_pair

    emit(generate_key_pair(private_key, public_key or f"{private_key}.pub"), _print_keys, json_out)


def _print_keys(keys) -> None:
    console().print(
        f"wrote [bold]{escape(str(keys.private_key))}[/bold] (private: keep it) and "
        f"[bold]{escape(str(keys.public_key))}[/bold] (public: give it to the targets); "
        f"public key SHA-256 {keys.key_id}"
    )
