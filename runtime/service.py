"""``swapvae serve``: the process around the server (runtime/server.py): keys, the process's
limits, signals and the ready line.

- ``--core N`` pins every thread of the process to CPU N (``os.sched_setaffinity``), first
  thing, so ZeroMQ's I/O thread and ONNX Runtime's threads are started there too.
- The soft limit on open descriptors is raised to the hard one (idle connections cost one
  each), and glibc is told to return large blocks to the system when they are freed.
- ``--curve-secret FILE --allow DIR_OR_FILE``: CURVE on every socket the server binds, clients
  let in by their public keys; required on binds other machines can reach unless ``--insecure``.
- SIGINT and SIGTERM stop the loop; SIGHUP reloads the bundle from the path given (re-resolved:
  a ``current`` symlink the operator swapped), verified with the same ``--trust`` keys, keeping
  the old one if the new one fails.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def serve_command(args) -> int:
    from swapvae.runtime.security import CurveServer, key_or_file, pin_to_core, raise_open_files, return_big_blocks_to_the_os

    if args.core is not None:
        pin_to_core(args.core)
    raise_open_files()
    return_big_blocks_to_the_os()

    from swapvae.runtime.bundle import load_public_key
    from swapvae.runtime.engine import BundleDecoder
    from swapvae.runtime.server import MAX_STREAMS, Server

    if bool(args.curve_secret) != bool(args.allow):
        raise ValueError("CURVE needs both --curve-secret (this server's key pair) and --allow (clients' public keys)")
    if args.curve_secret and Path(args.bundle).resolve() in Path(args.curve_secret).resolve().parents:
        raise ValueError(f"{args.curve_secret} lies inside the bundle {args.bundle}: keep keys out of bundles")
    curve = CurveServer.from_files(args.curve_secret, args.allow) if args.curve_secret else None
    trusted = [load_public_key(p) for p in args.trust] if args.trust else None

    def load():  # the path as given: a symlink is resolved anew on every reload
        return BundleDecoder(args.bundle, provider=args.provider, spin=args.busy_poll, trusted=trusted)

    options = {}
    if args.max_request_bytes is not None:
        options["max_body_bytes"] = args.max_request_bytes - 32
    if args.control_rate is not None:
        options["control_rate"] = args.control_rate
    if args.slice_us is not None:
        options["slice_ns"] = int(args.slice_us * 1000)
    server = Server(load(), bind=args.bind, sub=args.sub, pub=args.pub, busy_poll=args.busy_poll,
                    provider=args.provider, prewarm=not args.no_prewarm,
                    max_streams=MAX_STREAMS if args.max_streams is None else args.max_streams,
                    curve=curve, insecure=args.insecure, loader=load,
                    sub_server_key=key_or_file(args.sub_server_key) if args.sub_server_key else None, **options)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    signal.signal(signal.SIGHUP, lambda *_: server.request_reload())
    where = " ".join(f"{k}={v}" for k, v in server.endpoints.items())
    # One parseable line: tests and scripts wait for it to learn the bound ports.
    print(f"ready {where} channels={server.n_channels} pid={os.getpid()}"
          f"{' busy-poll' if args.busy_poll else ''}{' curve' if curve else ''}", flush=True)
    try:
        server.run()
    finally:
        server.close()
    s = server.stats()
    print(f"stopped after {s.requests} requests ({s.bins} bins decoded, "
          f"{sum(s.errors.values())} errors)", file=sys.stderr, flush=True)
    return 0
