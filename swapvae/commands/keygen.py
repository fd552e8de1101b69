"""``swapvae keygen sign|curve NAME``."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    k = sub.add_parser("keygen", help="write a key pair (sign: NAME.key private and NAME.pub; curve: NAME.key_secret "
                                      "private and NAME.key public); private files mode 0600, never overwritten")
    k.add_argument("kind", choices=["sign", "curve"],
                   help="sign: Ed25519, to sign bundles (export --sign, serve --trust); curve: ZeroMQ CURVE, to "
                        "authenticate and encrypt the service (serve --curve-secret/--allow, clients' keys)")
    k.add_argument("name", help="path stem of the two files")
    k.set_defaults(run=keygen)


def keygen(args: argparse.Namespace) -> int:
    if args.kind == "curve":
        from swapvae.runtime.security import generate_curve_keys as generate
        where = "keep it on the machine that uses it, off bundles and repositories"
    else:
        from swapvae.runtime.bundle import generate_signing_key as generate
        where = "keep it off rigs, bundles and repositories"
    try:
        private, public = generate(args.name)
    except FileExistsError as e:
        raise ValueError(f"{e.filename or e.args[0]} exists: refusing to overwrite a key") from None
    print(f"wrote {private} (private: {where}) and {public}")
    return 0
