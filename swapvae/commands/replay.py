"""``swapvae replay BUNDLE``: a recording's test bins through a running service."""
from __future__ import annotations

import argparse
import json

from swapvae.commands.options import add_curve_client, add_data, add_nwb, curve_kwargs, nwb_kwargs


def register(sub) -> None:
    r = sub.add_parser("replay", help="stream a recording's test bins through a running service")
    r.add_argument("bundle")
    add_data(r, "the bundle")
    r.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    r.add_argument("--rate", type=float, default=0.0, help="bins per second (0: back to back)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--plot", metavar="PNG", help="write a histogram of the round trips and in-server times "
                                                 "(needs matplotlib)")
    add_curve_client(r)
    add_nwb(r)
    r.set_defaults(run=replay)


def load_session_any(data: str, min_trials: int = 4, **options):
    """A session for the runtime's replay: a .npz with numpy alone (a rig install), anything
    else (an NWB file read with ``options``, simulated, synthetic) through the training side."""
    from swapvae.schemas.session import read_npz

    if str(data).endswith(".npz") and not options:
        return read_npz(data, min_trials)
    from swapvae.training.data import load_session

    return load_session(data, min_trials, **options)


def replay(args: argparse.Namespace) -> int:
    from swapvae.runtime.bundle import read_manifest
    from swapvae.runtime.replay import replay as run
    from swapvae.schemas.session import same_recording

    if args.plot:
        from swapvae.runtime.latency_plot import require_matplotlib

        require_matplotlib()  # before streaming anything
    manifest = read_manifest(args.bundle)
    t = manifest.training
    data = same_recording(args.data, {"data": t.data, "data_sha256": t.data_sha256}, f"the bundle {args.bundle}",
                          args.other_session)
    r = run(args.bundle, load_session_any(data, **nwb_kwargs(args)), args.endpoint, args.rate,
            keep_times=bool(args.plot), **curve_kwargs(args))
    if args.plot:
        from swapvae.runtime.latency_plot import latency_histogram

        t = r.pop("times_ns")
        pace = f"{r['rate_hz']:g} Hz" if r["rate_hz"] else "back to back"
        latency_histogram({"round trip": t["round_trip"], "in server": t["server"]}, args.plot,
                          f"replay of {r['session']} ({r['n_bins']} bins, {pace}) via {r['endpoint']}")
        r["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(r))
        return 0
    lat, srv = r["latency_us"], r["server_us"]
    pace = f"at {r['rate_hz']:g} Hz" if r["rate_hz"] else "back to back"
    print(f"replayed {r['n_bins']} test bins ({r['n_trials']} trials) of {r['session']} through {r['endpoint']} "
          f"{pace} ({r['bins_per_s']:.0f} bins/s)")
    if "scores" in r:
        print(f"latency only: {r['scores']}")
    else:
        print(f"reach acc {r['reach_acc']:.3f}, delta-acc {r['reach_delta_acc']:.3f} on the {r['n_scored']} moving "
              f"bins; velocity R^2 {r['velocity_r2']:.3f} (vx {r['velocity_r2_vx']:.3f}, vy {r['velocity_r2_vy']:.3f}) "
              f"on all")
    for name, p in (("round trip", lat), ("server", srv)):
        print(f"{name:<10}  p50 {p['p50']:7.1f}  p99 {p['p99']:7.1f}  p99.9 {p['p999']:7.1f}  max {p['max']:7.1f} us")
    if args.plot:
        print(f"latency histogram: {args.plot}")
    return 0
