"""``swapvae train`` and ``swapvae evaluate``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from swapvae.commands.options import add_data, add_nwb, nwb_kwargs


def register(sub) -> None:
    t = sub.add_parser("train", help="fit Swap-VAE on a session, evaluate it, write a run directory")
    t.add_argument("--data", nargs="+", metavar="DATA",
                   help=".npz or .nwb recording, 'simulated' (default) or 'synthetic[:SEED[:SEQUENCES]]'; "
                        "several: with --shared one model across them, else one run each (OUT/SESSION) trained in "
                        "parallel on Ray (the [sweep] extra); with --resume, where the run's recording is now (its "
                        "sha256 must match)")
    t.add_argument("--shared", action="store_true",
                   help="one model across the --data sessions: a read-in and read-out per session around a shared "
                        "core (swapvae calibrate then fits a new session onto it)")
    t.add_argument("--out", help="run directory to write (refused if it exists, unless --force)")
    t.add_argument("--resume", metavar="RUN",
                   help="continue a training into RUN (its --out) that stopped early, from its last checkpoint in "
                        ".RUN.partial, as it was configured: the run an uninterrupted training writes")
    t.add_argument("--validation", action="store_true",
                   help="train and score inside the training trials (the first 80%% of them train, the last 20%% "
                        "are scored; the test trials unused): where settings are chosen")
    t.add_argument("--force", action="store_true",
                   help="replace an existing --out, once the new run is complete (until then it is untouched)")
    t.add_argument("--config", help="JSON config (swapvae.schemas.SwapVAEConfig); defaults otherwise")
    t.add_argument("--seed", type=int, help="overrides the config's seed")
    t.add_argument("--device", help="overrides the config's device: auto, cpu, cuda or cuda:N")
    t.add_argument("--variant", help="ablation preset: swap_vae, no_swap, no_align, vae, beta_vae")
    t.add_argument("--epochs", type=int, help="overrides optim.epochs")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--address", help="several --data without --shared: a Ray cluster to train on (default: "
                                     "RAY_ADDRESS, else a local Ray on this machine's loopback address)")
    t.add_argument("--gpus-per-run", type=float, default=0.0,
                   help="several --data without --shared: each run's share of a GPU (default 0: CPU only); a run's "
                        "CPUs are its optim.cpu_threads (1 when automatic)")
    add_nwb(t)
    t.set_defaults(run=train)

    e = sub.add_parser("evaluate", help="print the metrics table of a run")
    e.add_argument("run_dir")
    add_data(e, "the run")
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    add_nwb(e, rerun=True)
    e.set_defaults(run=evaluate)


def config_of(args: argparse.Namespace):
    """The run's config: ``--config`` (or the defaults) with the flags that override it."""
    from swapvae.schemas import SwapVAEConfig

    config = SwapVAEConfig.from_file(args.config) if args.config else SwapVAEConfig()
    raw = config.model_dump(exclude_unset=True)
    if args.variant:  # a variant's preset replaces the model and loss sections given
        raw = {**{k: v for k, v in raw.items() if k in ("seed", "device", "data", "readout", "optim")},
               "variant": args.variant}
    if args.seed is not None:
        raw["seed"] = args.seed
    if args.device:
        raw["device"] = args.device
    if args.epochs:
        raw["optim"] = {**raw.get("optim", {}), "epochs": args.epochs}
    return SwapVAEConfig.model_validate(raw)


RESUME_FIXES = ("config", "seed", "device", "variant", "epochs", "shared", "validation", "out", "address")


def train(args: argparse.Namespace) -> int:
    from swapvae.training.run import format_table, resume_run, train_run
    from swapvae.training.staging import partial_dir

    if args.resume:
        given = [f"--{k}" for k in RESUME_FIXES if getattr(args, k) not in (None, False)]
        given += ["the NWB options"] if nwb_kwargs(args) else []
        if given:
            raise ValueError(f"--resume continues the run as it was configured: drop {', '.join(given)} (--data "
                             f"says where its recording is now)")
        if args.data and len(args.data) > 1:
            raise ValueError("--resume continues a single-session run: one --data at most")
        out = args.resume
    elif not args.out:
        raise ValueError("--out is required: the run directory to write (or --resume RUN)")
    else:
        out = args.out
    data = args.data or ["simulated"]
    if args.validation and args.shared:
        raise ValueError("--validation scores one session's run; with --shared, train without it")
    if (args.address or args.gpus_per_run) and (len(data) < 2 or args.shared):
        raise ValueError("--address and --gpus-per-run place the runs of several --data sessions (without --shared) "
                         "on Ray")
    if len(data) > 1 and not args.shared:
        return _train_sessions(args, data, out)
    try:
        if args.resume:
            metrics = resume_run(out, progress=not args.quiet, data=args.data[0] if args.data else None,
                                 force=args.force)
        elif args.shared:
            from swapvae.training.run import train_shared_run

            metrics = train_shared_run(data, out, config_of(args), progress=not args.quiet,
                                       options=nwb_kwargs(args), force=args.force)
        else:
            metrics = train_run(data[0], out, config_of(args), progress=not args.quiet,
                                options=nwb_kwargs(args), force=args.force, validation=args.validation)
    except KeyboardInterrupt:
        partial = partial_dir(Path(out))
        where = f"; the run so far is in {partial}" if partial.exists() else ""
        if (partial / "checkpoint.pt").is_file() and not args.shared:
            where += f", with its last checkpoint (swapvae train --resume {out} continues it)"
        raise KeyboardInterrupt(f"{out} was left as it was{where}") from None
    print(format_table(metrics))
    print(f"run written to {out}")
    return 0


def _train_sessions(args: argparse.Namespace, data: list[str], out: str) -> int:
    """Several sessions without --shared: one independent run each, in parallel on Ray."""
    from swapvae.schemas.sweep import SessionSpec
    from swapvae.training.sweep import format_sessions, train_sessions

    sessions = [SessionSpec(data=d, **nwb_kwargs(args)) for d in data]
    results = train_sessions(sessions, out, config_of(args), validation=args.validation, force=args.force,
                             address=args.address, gpus=args.gpus_per_run,
                             say=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_sessions(results))
    print(f"runs written to {out}/SESSION; the table to {out}/results.csv and .json")
    return 1 if any("error" in r for r in results["runs"].values()) else 0


def evaluate(args: argparse.Namespace) -> int:
    from swapvae.training.run import evaluate_run, format_table

    metrics = evaluate_run(args.run_dir, args.data, nwb_kwargs(args), other_session=args.other_session)
    print(json.dumps(metrics) if args.json else format_table(metrics))
    return 0
