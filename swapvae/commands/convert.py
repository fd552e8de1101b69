"""``swapvae convert DATA --out FILE.npz``: any session ``load_session`` reads, as a .npz."""
from __future__ import annotations

import argparse

from swapvae.commands.options import add_nwb, nwb_kwargs


def register(sub) -> None:
    c = sub.add_parser("convert", help="write a session (e.g. an NWB file, binned) as a .npz (docs/DATA.md)")
    c.add_argument("data", help=".nwb or .npz recording, 'simulated' or 'synthetic[:SEED[:SEQUENCES]]'")
    c.add_argument("--out", required=True, help=".npz file to write")
    add_nwb(c)
    c.set_defaults(run=convert)


def convert(args: argparse.Namespace) -> int:
    from swapvae.schemas.session import DataError, write_npz
    from swapvae.training.data import load_session

    if not str(args.out).endswith(".npz"):
        raise DataError(f"--out {args.out}: the file written is a .npz; name it so")
    session = load_session(args.data, min_trials=1, **nwb_kwargs(args))
    write_npz(session, args.out)
    labels = "target and velocity" if session.has_labels else "no labels (target, velocity)"
    print(f"{args.out}: {session.n_bins} bins of {session.bin_size_s:g} s x {session.n_neurons} channels, "
          f"{len(session.trials)} trials, {labels}")
    return 0
