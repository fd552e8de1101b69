"""The ``swapvae`` command. It sits above both sides: each sub-command imports its module only
when run, training commands from ``training`` (the [train] extra: torch, scikit-learn, onnx)
and serving commands from ``runtime``, so ``swapvae serve`` and ``replay`` on a rig PC never
import torch or scikit-learn."""
from __future__ import annotations

import argparse
import importlib
import sys


def _curve_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server-key", metavar="KEY",
                   help="CURVE: the service's public key (its NAME.key file or the Z85 text); with --client-secret")
    p.add_argument("--client-secret", metavar="FILE",
                   help="CURVE: this client's key pair (NAME.key_secret from 'swapvae keygen curve NAME'), "
                        "on the service's --allow list")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swapvae", description="Swap-VAE training and real-time decoding")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fit Swap-VAE on a session, evaluate it, write a run directory")
    t.add_argument("--data", default="simulated",
                   help=".npz or .nwb recording, 'simulated' (default) or 'synthetic[:SEED[:SEQUENCES]]'")
    t.add_argument("--out", required=True, help="run directory to write")
    t.add_argument("--config", help="JSON config (schemas.SwapVAEConfig); defaults otherwise")
    t.add_argument("--seed", type=int, help="overrides the config's seed")
    t.add_argument("--device", help="overrides the config's device: auto, cpu, cuda or cuda:N")
    t.add_argument("--variant", help="ablation preset: swap_vae, no_swap, no_align, swap_only, vae, beta_vae")
    t.add_argument("--epochs", type=int, help="overrides optim.epochs")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _nwb_options(t)
    t.set_defaults(run="swapvae.training.run:train_command")

    e = sub.add_parser("evaluate", help="print the metrics table of a run")
    e.add_argument("run_dir")
    e.add_argument("--data", help="re-evaluate on this session (default: the run's own data)")
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    _nwb_options(e, rerun=True)
    e.set_defaults(run="swapvae.training.run:evaluate_command")

    x = sub.add_parser("export", help="export a run to an ONNX bundle directory")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="bundle directory to write")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--sign", metavar="KEY", help="sign the manifest with this Ed25519 private key (swapvae keygen sign)")
    x.add_argument("--weights", choices=["fp32", "int8"], default="fp32",
                   help="int8: quantize the served graph (for large d; checked against fp32 on the test bins)")
    x.set_defaults(run="swapvae.training.export:export_command")

    s = sub.add_parser("serve", help="serve a bundle over ZeroMQ")
    s.add_argument("bundle")
    s.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ROUTER endpoint for request/reply")
    s.add_argument("--sub", help="streaming mode: SUB endpoint to read bins from")
    s.add_argument("--pub", help="streaming mode: PUB endpoint to publish decodes on")
    s.add_argument("--busy-poll", action="store_true", help="spin instead of sleeping (dedicated core)")
    s.add_argument("--no-prewarm", action="store_true",
                   help="do not warm the engine just before a steady stream's next bin is due")
    s.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--trust", action="append", metavar="PUBKEY",
                   help="serve only a bundle signed by this Ed25519 public key (repeatable)")
    s.add_argument("--max-streams", type=int, metavar="N",
                   help="streams (clients) whose readout history is kept, default 1024; beyond N the least "
                        "recently used is dropped")
    s.add_argument("--curve-secret", metavar="FILE",
                   help="CURVE: this server's key pair (NAME.key_secret from 'swapvae keygen curve NAME', mode 0600)")
    s.add_argument("--allow", metavar="DIR_OR_FILE",
                   help="CURVE: the clients let in: a public key file (NAME.key) or a directory of them")
    s.add_argument("--insecure", action="store_true",
                   help="serve on an address other machines can reach without CURVE (no authentication, no encryption)")
    s.add_argument("--sub-server-key", metavar="KEY",
                   help="CURVE: the --sub publisher's public key (a .key file or its Z85 text); with --curve-secret")
    s.add_argument("--core", type=int, metavar="N", help="pin the process to CPU N")
    s.add_argument("--max-request-bytes", type=int, metavar="BYTES",
                   help="largest request frame read (default 2 MiB + 32; fewer bins per DECODE for wide arrays)")
    s.add_argument("--slice-us", type=float, metavar="US",
                   help="multi-bin DECODEs run in engine calls of about this long, one-bin ones between them "
                        "(default 500)")
    s.add_argument("--control-rate", type=float, metavar="PER_S",
                   help="INFO, STATS and PING per second per peer (default 50); beyond: RATE_LIMITED")
    s.set_defaults(run="swapvae.runtime.service:serve_command")

    r = sub.add_parser("replay", help="stream a recording's test bins through a running service")
    r.add_argument("bundle")
    r.add_argument("--data", help="recording whose test bins to stream (default: the bundle's training data)")
    r.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    r.add_argument("--rate", type=float, default=0.0, help="bins per second (0: back to back)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--plot", metavar="PNG", help="write a histogram of the round trips and in-server times "
                                                 "(needs matplotlib)")
    _curve_client_options(r)
    _nwb_options(r)
    r.set_defaults(run="swapvae.cli:replay_command")

    v = sub.add_parser("verify", help="load a bundle as the server would and print what it holds")
    v.add_argument("bundle")
    v.add_argument("--trust", action="append", metavar="PUBKEY",
                   help="require a signature by this Ed25519 public key, as serve --trust (repeatable)")
    v.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    v.add_argument("--endpoint", help="also wait until the service at this endpoint serves this bundle")
    v.add_argument("--wait", type=float, default=10.0, metavar="SECONDS", help="how long --endpoint waits (10)")
    v.add_argument("--json", action="store_true")
    _curve_client_options(v)
    v.set_defaults(run="swapvae.runtime.admin:verify_command")

    st = sub.add_parser("stats", help="print a running service's STATS reply")
    st.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5555",
                    help="the service's ROUTER endpoint (default tcp://127.0.0.1:5555)")
    st.add_argument("--json", action="store_true", help="the reply as one JSON object")
    st.add_argument("--timeout-ms", type=int, default=1000, help="give up after this long (1000)")
    _curve_client_options(st)
    st.set_defaults(run="swapvae.runtime.admin:stats_command")

    k = sub.add_parser("keygen", help="write a key pair (sign: NAME.key private and NAME.pub; curve: NAME.key_secret "
                                      "private and NAME.key public); private files mode 0600, never overwritten")
    k.add_argument("kind", choices=["sign", "curve"],
                   help="sign: Ed25519, to sign bundles (export --sign, serve --trust); curve: ZeroMQ CURVE, to "
                        "authenticate and encrypt the service (serve --curve-secret/--allow, clients' keys)")
    k.add_argument("name", help="path stem of the two files")
    k.set_defaults(run="swapvae.cli:keygen_command")

    g = sub.add_parser("report", help="write PNG figures of what a run learned")
    g.add_argument("run_dir")
    g.add_argument("--data", help="session to plot (default: the run's own data)")
    g.add_argument("--out", help="figure directory (default: RUN_DIR/figures)")
    _nwb_options(g, rerun=True)
    g.set_defaults(run="swapvae.training.report:report_command")

    c = sub.add_parser("convert", help="write a session (e.g. an NWB file, binned) as a .npz (docs/DATA.md)")
    c.add_argument("data", help=".nwb or .npz recording, 'simulated' or 'synthetic[:SEED[:SEQUENCES]]'")
    c.add_argument("--out", required=True, help=".npz file to write")
    _nwb_options(c)
    c.set_defaults(run="swapvae.training.data:convert_command")
    return p


def _nwb_options(p: argparse.ArgumentParser, rerun: bool = False) -> None:
    """How an .nwb recording is read (training.nwb, docs/DATA.md)."""
    note = " (default: as the run read its own)" if rerun else ""
    g = p.add_argument_group("NWB input", "how an .nwb recording is binned and labelled" + note)
    g.add_argument("--bin-size", type=float, dest="bin_size_s", metavar="SECONDS",
                   help="bin width inside each trial (default 0.1)")
    g.add_argument("--target-column", metavar="NAME",
                   help="trials-table column with each trial's reach direction class (with --velocity-series)")
    g.add_argument("--velocity-series", metavar="NAME",
                   help="TimeSeries of hand velocity (x, y) in a processing module or acquisition, sampled at "
                        "the bin centres (with --target-column); without both, training skips the reach readouts")


# What the [train] extra brings; a training command without them says so in one line.
TRAIN_MODULES = {"torch", "sklearn", "onnx", "matplotlib", "tqdm", "threadpoolctl", "pynwb", "hdmf", "h5py"}
NWB_OPTIONS = ("bin_size_s", "target_column", "velocity_series")  # training.data.NWB_OPTIONS


def load_session_any(data: str, min_trials: int = 4, **options):
    """A session for the runtime's replay: a .npz with numpy alone (a rig install), anything
    else (an NWB file read with ``options``, simulated, synthetic) through ``training.data``."""
    from swapvae.schemas.session import read_npz

    if str(data).endswith(".npz") and not options:
        return read_npz(data, min_trials)
    from swapvae.training.data import load_session

    return load_session(data, min_trials, **options)


def keygen_command(args) -> int:
    if args.kind == "curve":
        from swapvae.runtime.security import generate_curve_keys as generate
        where = "keep it on the machine that uses it, off bundles and repositories"
    else:
        from swapvae.runtime.bundle import generate_signing_key as generate
        where = "keep it off rigs, bundles and repositories"
    try:
        private, public = generate(args.name)
    except FileExistsError as e:
        raise ValueError(f"{e.filename or e.args[0]} exists: refusing to overwrite a key") from None
    print(f"wrote {private} (private: {where}) and {public}")
    return 0


def replay_command(args) -> int:
    from swapvae.runtime.replay import replay_command as run

    options = {k: getattr(args, k) for k in NWB_OPTIONS if getattr(args, k) is not None}
    return run(args, lambda data, min_trials=4: load_session_any(data, min_trials, **options))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    module, func = args.run.split(":")
    try:
        return getattr(importlib.import_module(module), func)(args) or 0
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "onnxruntime":
            print(f"swapvae {args.command}: needs ONNX Runtime, and none is installed: pip install "
                  f"'swapvae-bci[cpu]' (or '[gpu]' for the CUDA provider; one of the two, never both)",
                  file=sys.stderr)
            return 2
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
