"""deploy/'s files read the way systemd reads them, for the deploy and rig-install tests.

``unit_command`` is the service's command line as systemd would run it: the unit's ExecStart
with the variables of serve.env (some overridden by the test) substituted by systemd's rules
(systemd.service(5), "Command lines"): ``${VAR}`` is replaced by the exact value, always one
argument; ``$VAR`` as a word of its own is split at whitespace, quotes respected, into zero or
more arguments. serve.env is read by EnvironmentFile='s rules (systemd.exec(5)): blank lines
and lines starting with # or ; are skipped, leading and trailing whitespace is dropped, and a
quoted value loses its quotes.
"""
from __future__ import annotations

import re
import select
import shlex
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "swapvae-serve.service"
ENV = DEPLOY / "serve.env"
RIG_SWAPVAE = "/opt/swapvae/venv/bin/swapvae"  # where the unit runs swapvae from
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


def read_env_file(path: Path = ENV) -> dict[str, str]:
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        assert re.fullmatch(_NAME, key), f"{path.name}: not a variable name: {key!r}"
        if value[:1] in ("'", '"'):
            parts = shlex.split(value)
            assert len(parts) == 1, f"{path.name}: {key}: text after the closing quote"
            value = parts[0]
        env[key] = value
    return env


def read_unit(path: Path = UNIT) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit (continued lines joined), values by key in order."""
    keys: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or line.startswith("[") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def expand(command: str, env: dict[str, str]) -> list[str]:
    """An Exec*= line's arguments with ``env`` substituted as systemd does it."""
    argv = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$(" + _NAME + ")", word)
        if whole:
            argv += shlex.split(env.get(whole.group(1), ""))
            continue

        def one(m):
            assert m.group(1) in env, f"{m.group(1)} is used in the unit but serve.env does not set it"
            return env[m.group(1)]
        argv.append(re.sub(r"\$\{(" + _NAME + r")\}", one, word))
    return argv


def serve_options(swapvae: str) -> str:
    """``swapvae serve --help`` of that executable."""
    return subprocess.run([swapvae, "serve", "--help"], capture_output=True, text=True, timeout=60, check=True).stdout


def unit_command(overrides: dict[str, str], swapvae: str, root: str = "") -> list[str]:
    """The unit's ExecStart with serve.env's values (``overrides`` replacing some), run by the
    ``swapvae`` given instead of the rig's path; ``root`` prefixes the rig's absolute paths
    (a test root from install.sh). Every option the unit passes must be one ``swapvae serve``
    lists in its --help."""
    env = {**read_env_file(), **overrides}
    (exec_start,) = read_unit()["ExecStart"]
    argv = expand(exec_start.lstrip("-@+!:"), env)
    assert argv[0] == RIG_SWAPVAE and argv[1] == "serve", argv
    argv[0] = swapvae
    if root:
        argv = [root + a if a.startswith("/opt/swapvae/") or a.startswith("/etc/swapvae/") else a for a in argv]
    known = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", serve_options(swapvae)))
    unknown = [a for a in argv if a.startswith("--") and a.split("=", 1)[0] not in known]
    assert not unknown, f"the unit passes {unknown}, which swapvae serve does not have"
    return argv


class Served:
    """A server started from an argv; ``endpoints`` from its ready line."""

    def __init__(self, argv: list[str], cwd: str | Path | None = None, env: dict | None = None,
                 timeout_s: float = 60.0):
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line = self.proc.stdout.readline()
                if line.startswith("ready "):
                    self.endpoints = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                    self.endpoint = self.endpoints.get("router")
                    return
            if self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"{shlex.join(argv)} did not start: {self.stderr[-3000:]}")

    def stop(self) -> int:
        if self.proc.stdout.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.stderr = self.proc.stderr.read()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()
        return self.proc.returncode

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
