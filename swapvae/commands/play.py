"""``swapvae play RECORDING --lsl NAME``: a recording's bins, or its spikes, into an LSL outlet."""
from __future__ import annotations

import argparse
import json
import sys

from swapvae.commands.options import add_nwb, nwb_kwargs


def register(sub) -> None:
    p = sub.add_parser("play", help="play a recording's bins or spikes into an LSL outlet at their real rate "
                                    "(bench tests and demos without a rig)")
    p.add_argument("recording", help="a .npz or NWB file, or a built-in session (simulated, synthetic:N)")
    p.add_argument("--lsl", required=True, metavar="NAME", help="the outlet's stream name")
    p.add_argument("--bundle", metavar="DIR",
                   help="play the test bins this bundle was evaluated on (as swapvae replay sends them); "
                        "default: every trial of the recording")
    p.add_argument("--kind", choices=["counts", "spikes"], default="counts",
                   help="one sample a bin of counts (default), or one a spike (its channel; times drawn within "
                        "the bin)")
    p.add_argument("--speed", type=float, default=1.0, help="times the real rate (timestamps stay the recording's)")
    p.add_argument("--wait-s", type=float, default=30.0, metavar="S", help="how long to wait for a consumer")
    p.add_argument("--seed", type=int, default=0, help="the spike times' draw")
    p.add_argument("--json", action="store_true")
    add_nwb(p)
    p.set_defaults(run=play)


def play(args: argparse.Namespace) -> int:
    import numpy as np

    from swapvae.commands.replay import load_session_any
    from swapvae.runtime.lsl import play as run

    session = load_session_any(args.recording, **nwb_kwargs(args))
    counts, trial, bin_s = session.counts, session.trial, session.bin_size_s
    if args.bundle:
        from swapvae.runtime.bundle import read_manifest
        from swapvae.runtime.replay import replay_bins

        bins = replay_bins(read_manifest(args.bundle), session)
        counts, trial = bins.counts, np.cumsum(bins.first)
    r = run(np.asarray(counts, np.float32), np.asarray(trial), bin_s, args.lsl, kind=args.kind, speed=args.speed,
            wait_s=args.wait_s, seed=args.seed, say=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(r) if args.json else
          f"played {r['bins']} bins ({r['trials']} trials, {r['spikes']} spikes) into {args.lsl!r} in "
          f"{r['seconds']:.1f} s")
    return 0
