"""``swapvae serve BUNDLE``: the flags of ``swapvae.runtime.serve.service.serve``."""
from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve a bundle over ZeroMQ")
    s.add_argument("bundle")
    s.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ROUTER endpoint for request/reply")
    s.add_argument("--sub", help="streaming mode: SUB endpoint to read bins from")
    s.add_argument("--pub", help="streaming mode: PUB endpoint to publish decodes on")
    s.add_argument("--busy-poll", action="store_true", help="spin instead of sleeping (dedicated core)")
    s.add_argument("--no-prewarm", action="store_true",
                   help="do not warm the engine just before a steady stream's next bin is due")
    s.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--trust", action="append", metavar="PUBKEY",
                   help="serve only a bundle signed by this Ed25519 public key (repeatable)")
    s.add_argument("--max-streams", type=int, metavar="N",
                   help="streams (clients) whose readout history is kept, default 1024; beyond N the least "
                        "recently used is dropped")
    s.add_argument("--curve-secret", metavar="FILE",
                   help="CURVE: this server's key pair (NAME.key_secret from 'swapvae keygen curve NAME', mode 0600)")
    s.add_argument("--allow", metavar="DIR_OR_FILE",
                   help="CURVE: the clients let in: a public key file (NAME.key) or a directory of them")
    s.add_argument("--insecure", action="store_true",
                   help="serve on an address other machines can reach without CURVE (no authentication, no encryption)")
    s.add_argument("--sub-server-key", metavar="KEY",
                   help="CURVE: the --sub publisher's public key (a .key file or its Z85 text); with --curve-secret")
    s.add_argument("--core", type=int, metavar="N", help="pin the process to CPU N")
    s.add_argument("--max-request-bytes", type=int, metavar="BYTES",
                   help="largest request frame read (default 2 MiB + 32; fewer bins per DECODE for wide arrays)")
    s.add_argument("--slice-us", type=float, metavar="US",
                   help="multi-bin DECODEs run in engine calls of about this long, one-bin ones between them "
                        "(default 500)")
    s.add_argument("--control-rate", type=float, metavar="PER_S",
                   help="INFO, STATS and PING per second per peer (default 50); beyond: RATE_LIMITED")
    s.add_argument("--allow-channel-change", action="store_true",
                   help="let a reload (SIGHUP) switch to a bundle that takes another number of channels (clients "
                        "still sending the old count then get BAD_SHAPE); refused otherwise")
    lsl = s.add_argument_group("Lab Streaming Layer (the [lsl] extra)")
    lsl.add_argument("--lsl-in", metavar="QUERY",
                     help="also decode an LSL stream: its name, or a predicate such as \"name='rig1' and "
                          "type='spikes'\"; checked against the bundle before serving")
    lsl.add_argument("--lsl-out", metavar="NAME", help="the outlet the decodes go to (default: QUERY-swapvae)")
    lsl.add_argument("--lsl-kind", choices=["counts", "fine", "spikes"], default="counts",
                     help="one input sample is a bin of counts (default), a finer bin of counts, or a spike "
                          "(its channel at its timestamp)")
    lsl.add_argument("--lsl-rates", action="store_true", help="also push the denoised rates")
    lsl.add_argument("--lsl-publish", choices=["newest", "all"], default="newest",
                     help="of a backlog, push only the newest decode (default; the rest counted in STATS) or all")
    lsl.add_argument("--lsl-step-ms", type=float, metavar="MS",
                     help="decode every MS ms, a sliding window of the bundle's bin (fine or spike input; MS "
                          "divides the bin)")
    lsl.add_argument("--lsl-wait-s", type=float, default=30.0, metavar="S",
                     help="how long to wait for the input stream to appear (default 30)")
    s.set_defaults(run=serve)


def lsl_kwargs(args: argparse.Namespace) -> dict | None:
    if args.lsl_in is None:
        given = [f for f, v in (("--lsl-out", args.lsl_out), ("--lsl-rates", args.lsl_rates),
                                ("--lsl-step-ms", args.lsl_step_ms)) if v]
        if given:
            raise ValueError(f"{', '.join(given)} configure the LSL bridge: give --lsl-in too")
        return None
    return {"query": args.lsl_in, "out_name": args.lsl_out, "kind": args.lsl_kind, "rates": args.lsl_rates,
            "publish": args.lsl_publish, "wait_s": args.lsl_wait_s, "step_ms": args.lsl_step_ms}


def serve(args: argparse.Namespace) -> int:
    from swapvae.runtime.serve.service import serve as run

    s = run(args.bundle, bind=args.bind, sub=args.sub, pub=args.pub, busy_poll=args.busy_poll,
            prewarm=not args.no_prewarm, provider=args.provider, trust=args.trust, max_streams=args.max_streams,
            curve_secret=args.curve_secret, allow=args.allow, insecure=args.insecure,
            sub_server_key=args.sub_server_key, core=args.core, max_request_bytes=args.max_request_bytes,
            slice_us=args.slice_us, control_rate=args.control_rate, allow_channel_change=args.allow_channel_change,
            lsl=lsl_kwargs(args))
    print(f"stopped after {s.requests} requests ({s.bins} bins decoded, {sum(s.errors.values())} errors)",
          file=sys.stderr, flush=True)
    return 0
