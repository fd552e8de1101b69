"""Places for tests to run things that could reach beyond the test: a network namespace that
holds only loopback (for what discovers peers or binds every interface), and a mount namespace
whose /etc, /opt, /var and /root writes land in throwaway overlay layers (for a deploy script
that, misbehaving, would change the machine). Both need root (CI is root); a test that cannot
have one skips and says why. Nothing here changes the machine itself."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEM_DIRS = ("/etc", "/opt", "/var", "/root")


def _root_or_skip(what: str) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip(f"{what} needs root and unshare (CI has both)")


def loopback_only(argv: list[str]) -> list[str]:
    """``argv`` run in a new network namespace with only ``lo``, up (127.0.0.1): it can bind
    any address and multicast as it likes, and nothing leaves the machine. Skips without one."""
    _root_or_skip("a loopback-only network namespace")
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"no network namespace here: {probe.stderr.strip()}")
    return ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {shlex.join(argv)}"]


def system_untouched(argv: list[str], layers: Path, **run) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``argv`` in a private mount namespace where /etc, /opt, /var and /root are overlays:
    the machine's directories stay as they were whatever it does. Returns the result and every
    path it created, changed or removed there (relative to the system directories)."""
    _root_or_skip("a throwaway overlay of the system directories")
    mounts = []
    for d in SYSTEM_DIRS:
        up, work = layers / d.strip("/") / "upper", layers / d.strip("/") / "work"
        up.mkdir(parents=True)
        work.mkdir(parents=True)
        mounts.append(f"mount -t overlay overlay -o lowerdir={d},upperdir={up},workdir={work} {d}")
    script = " && ".join([*mounts, f"exec {shlex.join(argv)}"])
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], text=True,
                         capture_output=True, **run)
    if out.returncode and "overlay" in out.stderr and "mount" in out.stderr:
        pytest.skip(f"no overlay mounts here: {out.stderr.strip()}")
    changed = sorted(f"{d}/{p.relative_to(layers / d.strip('/') / 'upper')}" for d in SYSTEM_DIRS
                     for p in (layers / d.strip("/") / "upper").rglob("*"))
    return out, changed
