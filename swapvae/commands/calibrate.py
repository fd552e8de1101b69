"""``swapvae calibrate RUN --data NEW --out RUN2``: a new session onto a shared core."""
from __future__ import annotations

import argparse
from pathlib import Path

from swapvae.commands.options import add_nwb, nwb_kwargs


def register(sub) -> None:
    c = sub.add_parser("calibrate", help="fit a new session (another day, other units) onto a run trained with "
                                         "--shared: a new read-in and read-out on its unlabelled bins, the core "
                                         "frozen, the readout on its first N labelled trials")
    c.add_argument("run_dir", help="a run trained with swapvae train --shared")
    c.add_argument("--data", required=True, help="the new session's recording (.npz or .nwb)")
    c.add_argument("--out", required=True, help="run directory to write: an ordinary run (refused if it exists, "
                                                "unless --force)")
    c.add_argument("--labelled-trials", type=int, metavar="N",
                   help="fit the readout on the first N training trials only (a calibration block; default: all); "
                        "0: no labels, the reference sessions' readout")
    c.add_argument("--seed", type=int, help="overrides the reference run's seed")
    c.add_argument("--force", action="store_true", help="replace an existing --out once the new run is complete")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    add_nwb(c)
    c.set_defaults(run=calibrate)


def calibrate(args: argparse.Namespace) -> int:
    from swapvae.training.run import calibrate_run, format_table
    from swapvae.training.staging import partial_dir

    if args.labelled_trials is not None and args.labelled_trials < 0:
        raise ValueError(f"--labelled-trials {args.labelled_trials}: a count of trials, 0 or more")
    try:
        metrics = calibrate_run(args.run_dir, args.data, args.out, args.labelled_trials, args.seed,
                                progress=not args.quiet, options=nwb_kwargs(args), force=args.force)
    except KeyboardInterrupt:
        partial = partial_dir(Path(args.out))
        where = f"; the run so far is in {partial}" if partial.exists() else ""
        raise KeyboardInterrupt(f"{args.out} was left as it was{where}") from None
    print(format_table(metrics))
    print(f"run written to {args.out}")
    return 0
