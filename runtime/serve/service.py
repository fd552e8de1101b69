"""``swapvae serve``: the process around the server (runtime/serve/server.py): keys, the
process's limits, signals and the ready line. The command's flags map one to one onto
``serve``'s keywords (swapvae/commands/serve.py).

- ``core=N`` pins every thread of the process to CPU N (``os.sched_setaffinity``), first
  thing, so ZeroMQ's I/O thread and ONNX Runtime's threads are started there too.
- The soft limit on open descriptors is raised to the hard one (idle connections cost one
  each), and glibc is told to return large blocks to the system when they are freed.
- ``curve_secret=FILE, allow=DIR_OR_FILE``: CURVE on every socket the server binds, clients let
  in by their public keys; required on binds other machines can reach unless ``insecure``.
- SIGINT and SIGTERM stop the loop; SIGHUP reloads the bundle from the path given (re-resolved:
  a ``current`` symlink the operator swapped), verified with the same ``trust`` keys, keeping
  the old one if the new one fails.
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from pathlib import Path

from swapvae.schemas.protocol import REQUEST_HEADER_SIZE, StatsReply


def serve(bundle: str | Path, *, bind: str | None = "tcp://127.0.0.1:5555", sub: str | None = None,
          pub: str | None = None, busy_poll: bool = False, prewarm: bool = True, provider: str = "cpu",
          trust: list[str] | None = None, max_streams: int | None = None, curve_secret: str | None = None,
          allow: str | None = None, insecure: bool = False, sub_server_key: str | None = None,
          core: int | None = None, max_request_bytes: int | None = None, slice_us: float | None = None,
          control_rate: float | None = None, allow_channel_change: bool = False,
          lsl: dict | None = None) -> StatsReply:
    """Serve ``bundle`` until SIGINT or SIGTERM (the module doc says how); print one ready line
    (``ready router=... channels=N pid=P``, which scripts wait for) and return the final STATS.

    ``lsl``: ``runtime.lsl.bridge``'s keywords (query, out_name, kind, rates, publish, wait_s, step_ms):
    an LSL inlet -> decode -> outlet bridge in a thread beside the sockets, with an engine of its
    own, set up (the input resolved and checked) before the ready line. It keeps the bundle it
    started with: a SIGHUP reload changes what the sockets serve, not the bridge."""
    if core is not None:
        pin_to_core(core)
    raise_open_files()
    return_big_blocks_to_the_os()

    from swapvae.runtime.bundle import load_public_key
    from swapvae.runtime.engine import BundleDecoder
    from swapvae.runtime.security import CurveServer, check_endpoint, key_or_file
    from swapvae.runtime.serve.server import MAX_STREAMS, Server

    for endpoint, flag in ((bind, "--bind"), (sub, "--sub"), (pub, "--pub")):  # before the bundle loads
        if endpoint is not None:
            check_endpoint(endpoint, flag)

    if bool(curve_secret) != bool(allow):
        raise ValueError("CURVE needs both --curve-secret (this server's key pair) and --allow (clients' public keys)")
    if curve_secret and Path(bundle).resolve() in Path(curve_secret).resolve().parents:
        raise ValueError(f"{curve_secret} lies inside the bundle {bundle}: keep keys out of bundles")
    curve = CurveServer.from_files(curve_secret, allow) if curve_secret else None
    trusted = [load_public_key(p) for p in trust] if trust else None

    def load():  # the path as given: a symlink is resolved anew on every reload
        return BundleDecoder(bundle, provider=provider, spin=busy_poll, trusted=trusted)

    options = {}
    if max_request_bytes is not None:
        options["max_body_bytes"] = max_request_bytes - REQUEST_HEADER_SIZE
    if control_rate is not None:
        options["control_rate"] = control_rate
    if slice_us is not None:
        options["slice_ns"] = int(slice_us * 1000)
    server = Server(load(), bind=bind, sub=sub, pub=pub, busy_poll=busy_poll, provider=provider, prewarm=prewarm,
                    max_streams=MAX_STREAMS if max_streams is None else max_streams, curve=curve, insecure=insecure,
                    loader=load, sub_server_key=key_or_file(sub_server_key) if sub_server_key else None,
                    allow_channel_change=allow_channel_change, **options)
    if lsl is not None:
        from swapvae.runtime.lsl import bridge

        try:
            server.lsl = bridge(bundle, provider=provider, trusted=trusted, prewarm=prewarm,
                                say=lambda s: print(s, file=sys.stderr, flush=True), **lsl)
        except BaseException:
            server.close()
            raise
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    signal.signal(signal.SIGHUP, lambda *_: server.request_reload())
    where = " ".join(f"{k}={v}" for k, v in server.endpoints.items())
    if server.lsl is not None:
        where += f" lsl-in={server.lsl.stream} lsl-out={server.lsl.out_name}"
    # One parseable line: tests and scripts wait for it to learn the bound ports.
    print(f"ready {where} channels={server.n_channels} pid={os.getpid()}"
          f"{' busy-poll' if busy_poll else ''}{' curve' if curve else ''}", flush=True)
    try:
        if server.lsl is not None:
            server.lsl.start()
        server.run()
    finally:
        if server.lsl is not None:
            server.lsl.stop()
        server.close()
    return server.stats()


# -- the process ---------------------------------------------------------------------------------

def raise_open_files() -> int:
    """Raise the soft limit on open descriptors to the hard one (idle connections cost one each,
    and running out stalls new clients, not only the idle ones); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


def return_big_blocks_to_the_os(threshold: int = 256 << 10) -> bool:
    """glibc: serve every allocation of ``threshold`` bytes or more by mmap, so that a large
    frame is returned to the system when freed. By default glibc raises that threshold after
    freeing a large block (up to 32 MiB), after which such memory stays with the process: RSS
    then keeps the peak of an attack long after it. False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, 2 * threshold))
    except (OSError, AttributeError):
        return False


def pin_to_core(core: int) -> None:
    """Pin every thread of this process (and the threads it starts later) to one CPU."""
    if core not in os.sched_getaffinity(0):
        raise ValueError(f"--core {core}: not one of this process's CPUs {sorted(os.sched_getaffinity(0))}")
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:  # a thread that ended meanwhile
            pass
