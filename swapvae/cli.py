"""The ``swapvae`` command. It sits above both sides: each sub-command (swapvae/commands/)
imports its side of the library only when run, training commands from ``swapvae.training``
(the [train] extra: torch, scikit-learn, onnx) and serving commands from ``swapvae.runtime``,
so ``swapvae serve`` and ``replay`` on a rig PC never import torch or scikit-learn.

What the user sees of a failure is one line on stderr and exit status 2: a missing extra
names the pip command, a user error (a bad file, a refused request) names the problem. Ctrl-C
ends a command with one line and status 130 (a training says where its partial run is); a
reader that closes the pipe early (``swapvae verify B --json | head``) ends it quietly, 141."""
from __future__ import annotations

import argparse
import os
import sys

from swapvae.commands import MODULES

# What the [train] extra brings; a training command without them says so in one line.
TRAIN_MODULES = {"torch", "sklearn", "onnx", "matplotlib", "tqdm", "threadpoolctl", "pynwb", "hdmf", "h5py"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swapvae", description="Swap-VAE training and real-time decoding")
    sub = p.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "onnxruntime":
            print(f"swapvae {args.command}: needs ONNX Runtime, and none is installed: pip install "
                  f"'swapvae-bci[cpu]' (or '[gpu]' for the CUDA provider; one of the two, never both)",
                  file=sys.stderr)
            return 2
        if e.name == "pylsl":
            print(f"swapvae {args.command}: needs pylsl for the Lab Streaming Layer: pip install 'swapvae-bci[lsl]'",
                  file=sys.stderr)
            return 2
        if e.name and e.name.split(".")[0] in ("ray", "optuna", "yaml"):
            print(f"swapvae {args.command}: needs Ray Tune and Optuna ({e.name} is not installed): pip install "
                  f"'swapvae-bci[sweep]'", file=sys.stderr)
            return 2
        if e.name and e.name.split(".")[0] in TRAIN_MODULES:
            print(f"swapvae {args.command}: needs the training dependencies ({e.name} is not installed): "
                  f"pip install 'swapvae-bci[train]'", file=sys.stderr)
            return 2
        raise
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # user-facing errors: no traceback
        print(f"swapvae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"swapvae {args.command}: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader has gone: nothing more to say, and no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
