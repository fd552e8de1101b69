"""``swapvae verify BUNDLE`` and ``swapvae stats [ENDPOINT]``."""
from __future__ import annotations

import argparse
import json

from swapvae.commands.options import add_curve_client, curve_kwargs


def register(sub) -> None:
    v = sub.add_parser("verify", help="load a bundle as the server would and print what it holds")
    v.add_argument("bundle")
    v.add_argument("--trust", action="append", metavar="PUBKEY",
                   help="require a signature by this Ed25519 public key, as serve --trust (repeatable)")
    v.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    v.add_argument("--endpoint", help="also wait until the service at this endpoint serves this bundle")
    v.add_argument("--wait", type=float, default=10.0, metavar="SECONDS", help="how long --endpoint waits (10)")
    v.add_argument("--json", action="store_true")
    add_curve_client(v)
    v.set_defaults(run=verify)

    st = sub.add_parser("stats", help="print a running service's STATS reply")
    st.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5555",
                    help="the service's ROUTER endpoint (default tcp://127.0.0.1:5555)")
    st.add_argument("--json", action="store_true", help="the reply as one JSON object")
    st.add_argument("--timeout-ms", type=int, default=1000, help="give up after this long (1000)")
    add_curve_client(st)
    st.set_defaults(run=stats)


def verify(args: argparse.Namespace) -> int:
    from swapvae.runtime.serve.admin import bundle_summary, format_summary, served_by

    s, manifest = bundle_summary(args.bundle, args.provider, args.trust)
    if args.endpoint:
        served_by(args.endpoint, manifest, args.wait, **curve_kwargs(args))
    print(json.dumps(s) if args.json else format_summary(s, args.endpoint))
    return 0


def stats(args: argparse.Namespace) -> int:
    from swapvae.runtime.serve.admin import format_stats
    from swapvae.runtime.serve.admin import stats as ask

    s = ask(args.endpoint, args.timeout_ms, **curve_kwargs(args))
    print(s.model_dump_json() if args.json else format_stats(s, args.endpoint))
    return 0
