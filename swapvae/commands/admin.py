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
    st.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                    help="ask again every SECONDS (1), showing rates and what was dropped since; Ctrl-C ends it")
    st.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N refreshes")
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
    if args.watch is None:
        print(s.model_dump_json() if args.json else format_stats(s, args.endpoint))
        return 0
    return watch(args, s)


def watch(args: argparse.Namespace, s) -> int:
    """Refresh the table every ``--watch`` seconds, with the rates since the last one, until
    Ctrl-C (or ``--count`` refreshes); on a terminal in place, else one table after another."""
    import sys
    import time

    from swapvae.runtime.serve.admin import format_rates, format_stats
    from swapvae.runtime.serve.admin import stats as ask

    if args.watch <= 0:
        raise ValueError(f"--watch {args.watch:g}: the interval must be > 0 seconds")
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    shown = 0
    try:
        while args.count is None or shown < args.count:
            time.sleep(args.watch)
            prev, s = s, ask(args.endpoint, args.timeout_ms, **curve_kwargs(args))
            if args.json:
                print(s.model_dump_json(), flush=True)
            else:
                print(f"{clear}{format_stats(s, args.endpoint)}\n{format_rates(prev, s)}\n", flush=True)
            shown += 1
    except KeyboardInterrupt:
        pass
    return 0
