"""The ``swapvae`` command. It sits above both sides: each sub-command imports its module only
when run, training commands from ``training`` (the [train] extra: torch, scikit-learn, onnx)
and serving commands from ``runtime``, so ``swapvae serve`` and ``replay`` on a rig PC never
import torch or scikit-learn."""
from __future__ import annotations

import argparse
import importlib
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swapvae", description="Swap-VAE training and real-time decoding")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fit Swap-VAE on a session, evaluate it, write a run directory")
    t.add_argument("--data", default="simulated", help=".npz recording, or 'simulated' (default)")
    t.add_argument("--out", required=True, help="run directory to write")
    t.add_argument("--config", help="JSON config (schemas.SwapVAEConfig); defaults otherwise")
    t.add_argument("--seed", type=int, help="overrides the config's seed")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides the config's device")
    t.add_argument("--variant", help="ablation preset: swap_vae, no_swap, no_align, swap_only, vae, beta_vae")
    t.add_argument("--epochs", type=int, help="overrides optim.epochs")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run="training.run:train_command")

    e = sub.add_parser("evaluate", help="print the metrics table of a run")
    e.add_argument("run_dir")
    e.add_argument("--data", help="re-evaluate on this session (default: the run's own data)")
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    e.set_defaults(run="training.run:evaluate_command")

    x = sub.add_parser("export", help="export a run to an ONNX bundle directory")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="bundle directory to write")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--weights", choices=["fp32", "int8"], default="fp32",
                   help="int8: quantize the served graph (for large d; checked against fp32 on the test bins)")
    x.set_defaults(run="training.export:export_command")

    s = sub.add_parser("serve", help="serve a bundle over ZeroMQ")
    s.add_argument("bundle")
    s.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ROUTER endpoint for request/reply")
    s.add_argument("--sub", help="streaming mode: SUB endpoint to read bins from")
    s.add_argument("--pub", help="streaming mode: PUB endpoint to publish decodes on")
    s.add_argument("--busy-poll", action="store_true", help="spin instead of sleeping (dedicated core)")
    s.add_argument("--no-prewarm", action="store_true",
                   help="do not warm the engine just before a steady stream's next bin is due")
    s.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--max-streams", type=int, metavar="N",
                   help="streams (clients) whose readout history is kept, default 1024; beyond N the least "
                        "recently used is dropped")
    s.set_defaults(run="runtime.server:serve_command")

    r = sub.add_parser("replay", help="stream a recording's test bins through a running service")
    r.add_argument("bundle")
    r.add_argument("--data", help="recording whose test bins to stream (default: the bundle's training data)")
    r.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    r.add_argument("--rate", type=float, default=0.0, help="bins per second (0: back to back)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(run="swapvae.cli:replay_command")

    g = sub.add_parser("report", help="write PNG figures of what a run learned")
    g.add_argument("run_dir")
    g.add_argument("--data", help="session to plot (default: the run's own data)")
    g.add_argument("--out", help="figure directory (default: RUN_DIR/figures)")
    g.set_defaults(run="training.report:report_command")
    return p


# What the [train] extra brings; a training command without them says so in one line.
TRAIN_MODULES = {"torch", "sklearn", "onnx", "matplotlib", "tqdm", "threadpoolctl"}


def load_session_any(data: str, min_trials: int = 4):
    """A session for the runtime's replay: a .npz with numpy alone (a rig install), anything
    else (simulated, synthetic) through ``training.data``."""
    from schemas.session import read_npz

    if str(data).endswith(".npz"):
        return read_npz(data, min_trials)
    from training.data import load_session

    return load_session(data, min_trials)


def replay_command(args) -> int:
    from runtime.replay import replay_command as run

    return run(args, load_session_any)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    module, func = args.run.split(":")
    try:
        return getattr(importlib.import_module(module), func)(args) or 0
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in TRAIN_MODULES:
            print(f"swapvae {args.command}: needs the training dependencies ({e.name} is not installed): "
                  f"pip install 'swapvae-bci[train]'", file=sys.stderr)
            return 2
        raise
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # user-facing errors: no traceback
        print(f"swapvae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
