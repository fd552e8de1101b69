"""``swapvae sweep SPEC --out DIR``: a search over config fields, sessions and seeds on Ray Tune."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    s = sub.add_parser("sweep", help="search config fields over sessions and seeds on Ray (the [sweep] extra): each "
                                     "trial a run scored on a validation split of its training trials, then each "
                                     "session's best trained and scored on its test trials")
    s.add_argument("spec", help="the SPEC, YAML or JSON (swapvae.schemas.sweep.SweepSpec)")
    s.add_argument("--out", required=True, help="the sweep's folder: trials/, chosen/, results.csv and .json")
    s.add_argument("--resume", action="store_true",
                   help="continue the sweep in --out: completed trials are kept, the rest run (a trial that "
                        "stopped mid-training resumes from its checkpoint)")
    s.add_argument("--export", action="store_true", help="also write each session's chosen run as a bundle "
                                                         "(OUT/bundles/SESSION)")
    s.add_argument("--address", help="a Ray cluster to run on (default: RAY_ADDRESS, else a local Ray on this "
                                     "machine's loopback address)")
    s.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    s.add_argument("--json", action="store_true", help="print the results as one JSON object")
    s.set_defaults(run=sweep)


def sweep(args: argparse.Namespace) -> int:
    from swapvae.schemas.sweep import SweepSpec

    spec = SweepSpec.from_file(args.spec)
    from swapvae.training.sweep import format_results, run_sweep

    results = run_sweep(spec, args.out, address=args.address, resume=args.resume, export=args.export,
                        num_cpus=args.num_cpus, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(results) if args.json else format_results(results))
    return 1 if results["failed"] else 0
