"""``swapvae report RUN_DIR``."""
from __future__ import annotations

import argparse

from swapvae.commands.options import add_data, add_nwb, nwb_kwargs


def register(sub) -> None:
    g = sub.add_parser("report", help="write PNG figures of what a run learned")
    g.add_argument("run_dir")
    add_data(g, "the run")
    g.add_argument("--out", help="figure directory (default: RUN_DIR/figures)")
    g.add_argument("--format", default="png", choices=["png", "pdf", "svg"], help="file format of the figures (png)")
    g.add_argument("--dpi", type=int, default=150, help="resolution of png figures, dots per inch (150; 300 for print)")
    add_nwb(g, rerun=True)
    g.set_defaults(run=report)


def report(args: argparse.Namespace) -> int:
    from swapvae.training.report import write_report

    written = write_report(args.run_dir, args.data, args.out, nwb_kwargs(args), other_session=args.other_session,
                           fmt=args.format, dpi=args.dpi)
    for path in written:
        print(path)
    if not any(p.stem == "confusion" for p in written):
        print("the session has no reach labels (target, velocity): the figures by direction were skipped")
    return 0
