"""Option groups several commands share, and their adapters to library keywords."""
from __future__ import annotations

import argparse

from swapvae.training.data import NWB_OPTIONS  # numpy only: the rig's replay reads NWB options too


def add_nwb(p: argparse.ArgumentParser, rerun: bool = False) -> None:
    """How an .nwb recording is read (swapvae.training.nwb, docs/DATA.md)."""
    note = " (default: as the run read its own)" if rerun else ""
    g = p.add_argument_group("NWB input", "how an .nwb recording is binned and labelled" + note)
    g.add_argument("--bin-size", type=float, dest="bin_size_s", metavar="SECONDS",
                   help="bin width inside each trial (default 0.1)")
    g.add_argument("--target-column", metavar="NAME",
                   help="trials-table column with each trial's reach direction class (with --velocity-series)")
    g.add_argument("--velocity-series", metavar="NAME",
                   help="TimeSeries of hand velocity (x, y) in a processing module or acquisition, sampled at "
                        "the bin centres (with --target-column); without both, training skips the reach readouts")


def nwb_kwargs(args: argparse.Namespace) -> dict:
    """The NWB options a command was given, as ``load_session`` keywords."""
    return {k: getattr(args, k) for k in NWB_OPTIONS if getattr(args, k, None) is not None}


def add_data(p: argparse.ArgumentParser, what: str) -> None:
    """``--data`` and ``--other-session`` for a command that reads a run's or a bundle's recording."""
    p.add_argument("--data", metavar="FILE",
                   help=f"the recording {what} was trained on, where it is now (default: where {what} says; its "
                        f"sha256 must match), or another session with --other-session")
    p.add_argument("--other-session", action="store_true",
                   help="--data is another recording on purpose (same channels): no sha256 check")


def add_curve_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server-key", metavar="KEY",
                   help="CURVE: the service's public key (its NAME.key file or the Z85 text); with --client-secret")
    p.add_argument("--client-secret", metavar="FILE",
                   help="CURVE: this client's key pair (NAME.key_secret from 'swapvae keygen curve NAME'), "
                        "on the service's --allow list")


def curve_kwargs(args: argparse.Namespace) -> dict:
    """A Client's CURVE keywords from ``--server-key`` and ``--client-secret``."""
    key, secret = getattr(args, "server_key", None), getattr(args, "client_secret", None)
    return {} if key is None and secret is None else {"server_key": key, "client_secret": secret}
