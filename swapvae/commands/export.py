"""``swapvae export RUN_DIR --out BUNDLE_DIR``."""
from __future__ import annotations

import argparse

from swapvae.commands.options import add_data


def register(sub) -> None:
    x = sub.add_parser("export", help="export a run to an ONNX bundle directory")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="bundle directory to write (refused if it exists, unless --force)")
    x.add_argument("--force", action="store_true", help="replace an existing --out once the new bundle is verified")
    add_data(x, "the run")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--sign", metavar="KEY",
                   help="sign the manifest with this Ed25519 private key (swapvae keygen sign)")
    x.add_argument("--weights", choices=["fp32", "int8"], default="fp32",
                   help="int8: quantize the served graph (for large d; checked against fp32 on the test bins)")
    x.set_defaults(run=export)


def export(args: argparse.Namespace) -> int:
    from swapvae.training.export import describe, export_bundle

    manifest = export_bundle(args.run_dir, args.out, opset=args.opset, weights=args.weights, sign=args.sign,
                             data=args.data, other_session=args.other_session, force=args.force)
    print(f"bundle written to {args.out}: {describe(manifest)}")
    return 0
