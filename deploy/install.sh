#!/usr/bin/env bash
# Install or update the decoding service on a rig PC (deploy/README.md):
#   sudo deploy/install.sh                      # the runtime with onnxruntime ([cpu])
#   sudo SWAPVAE_EXTRA=gpu deploy/install.sh    # with onnxruntime-gpu alone ([gpu])
#   sudo SWAPVAE_LSL=1 deploy/install.sh        # also pylsl, for serve --lsl-in ([lsl])
# Idempotent: run it again (e.g. after a git pull) to update the code. It never touches the
# bundles, the keys or an existing /etc/swapvae/serve.env, and it starts nothing.
#
# What it does, as root:
#   user      swapvae: a system account, no login shell, no home of its own (useradd --system)
#   /opt/swapvae/venv         root-owned venv: pip install '<this checkout>[cpu]' (or [gpu])
#   /opt/swapvae/bundles      root-owned; bundles are installed by install-bundle.sh
#   /opt/swapvae/bin/install-bundle.sh
#   /etc/swapvae/serve.env    the service's settings (copied once from deploy/serve.env)
#   /etc/swapvae/keys         root:swapvae 0750: trusted public keys and CURVE keys
#   /etc/systemd/system/swapvae-serve.service, then systemctl daemon-reload
# Network: pip's index only (or SWAPVAE_PIP_ARGS="--no-index --find-links /path/to/wheels").
#
# Variables: SWAPVAE_EXTRA (cpu|gpu), SWAPVAE_LSL (1: the [lsl] extra too), SWAPVAE_PYTHON (python3), SWAPVAE_PIP_ARGS (extra pip
# arguments, split at spaces), SWAPVAE_USER (swapvae). SWAPVAE_ROOT=/some/dir installs the
# files under that directory instead of / and leaves the system alone (no user, no chown, no
# systemctl), root or not: the tests run it so.
#
# Options (read before anything is done): --dry-run prints each step and changes nothing;
# --help prints this and changes nothing; anything else is refused with the usage.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: sudo deploy/install.sh [--dry-run]
  Install or update the decoding service: the system user swapvae, /opt/swapvae (venv,
  bundles, scripts), /etc/swapvae (serve.env, keys) and the systemd unit swapvae-serve.
  Idempotent; never touches bundles, keys or an existing serve.env; starts nothing.
  --dry-run   print every step it would take, change nothing
  -h, --help  print this, change nothing
Environment: SWAPVAE_EXTRA=cpu|gpu  SWAPVAE_LSL=1  SWAPVAE_PYTHON  SWAPVAE_PIP_ARGS  SWAPVAE_USER
  SWAPVAE_ROOT=DIR  install under DIR instead of / and leave the system alone (no user,
                    no owners, no systemctl): how the tests run it (deploy/README.md)
USAGE
}
DRY=false
for arg in "$@"; do
  case $arg in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY=true ;;
    *) echo "install.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
# Every step that changes the machine goes through act: printed instead under --dry-run.
act() {
  if $DRY; then printf 'install.sh: would run:'; printf ' %q' "$@"; echo; else "$@"; fi
}

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${SWAPVAE_ROOT:-}
PREFIX=$ROOT/opt/swapvae
ETC=$ROOT/etc/swapvae
UNITS=$ROOT/etc/systemd/system
SVC_USER=${SWAPVAE_USER:-swapvae}
EXTRA=${SWAPVAE_EXTRA:-cpu}
PYTHON=${SWAPVAE_PYTHON:-python3}
read -r -a PIP_ARGS <<< "${SWAPVAE_PIP_ARGS:-}"

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 2; }

case $EXTRA in
  cpu) OTHER=onnxruntime-gpu ;;
  gpu) OTHER=onnxruntime ;;
  *) die "SWAPVAE_EXTRA must be cpu or gpu (one ONNX Runtime, never both), not '$EXTRA'" ;;
esac
case ${SWAPVAE_LSL:-} in
  "" | 0) EXTRAS=$EXTRA ;;
  1) EXTRAS=$EXTRA,lsl ;;
  *) die "SWAPVAE_LSL must be 1 (install pylsl, the [lsl] extra) or 0, not '$SWAPVAE_LSL'" ;;
esac
real=false  # true: a real install (root, no SWAPVAE_ROOT), which creates the user and sets owners
if [ -z "$ROOT" ]; then
  $DRY || [ "$(id -u)" = 0 ] || die "run it as root (sudo), or set SWAPVAE_ROOT to install under another directory"
  real=true
fi
! $DRY || say "dry run: nothing below is done"
[ -f "$SRC/pyproject.toml" ] || die "$SRC is not a swapvae-bci checkout (no pyproject.toml)"

# 1. The service's user.
if $real; then
  if ! id -u "$SVC_USER" >/dev/null 2>&1; then
    act useradd --system --user-group --home-dir /opt/swapvae --no-create-home --shell /usr/sbin/nologin \
      --comment "Swap-VAE decoding service" "$SVC_USER"
    $DRY || say "created the system user $SVC_USER"
  fi
else
  say "under SWAPVAE_ROOT=$ROOT: no user $SVC_USER, no owners set, no systemctl"
fi

# 2. Directories. The service reads everything and writes nothing.
act install -d -m 0755 "$PREFIX" "$PREFIX/bundles" "$PREFIX/bin" "$ETC" "$UNITS"
act install -d -m 0750 "$ETC/keys"
if $real; then
  act chown root:root "$PREFIX" "$PREFIX/bundles" "$PREFIX/bin" "$ETC"
  act chown root:"$SVC_USER" "$ETC/keys"
fi

# 3. The venv, from a clean copy of the checkout: an in-tree build leaves build/ behind, and
# setuptools puts stale files from there into later wheels.
if $DRY; then
  stage="(a clean copy of $SRC)"
else
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
    --exclude=./runs --exclude=./bundles --exclude=./results --exclude=__pycache__ -cf - . | tar -C "$stage" -xf -
fi
if [ ! -x "$PREFIX/venv/bin/python" ]; then
  act "$PYTHON" -m venv "$PREFIX/venv"
  $DRY || say "created $PREFIX/venv ($("$PREFIX/venv/bin/python" --version))"
fi
pip=("$PREFIX/venv/bin/python" -m pip)
# One ONNX Runtime: both builds install the same module, so switching extras removes both first.
if [ -x "$PREFIX/venv/bin/python" ] && "${pip[@]}" show "$OTHER" >/dev/null 2>&1; then
  say "removing $OTHER (switching to [$EXTRA])"
  act "${pip[@]}" uninstall -y -q onnxruntime onnxruntime-gpu
fi
act "${pip[@]}" install -q ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "${stage}[$EXTRAS]"
$DRY || say "installed $("${pip[@]}" show swapvae-bci | sed -n 's/^Version: /swapvae-bci /p') [$EXTRAS] in $PREFIX/venv"

# 4. Scripts, settings and the unit.
act install -m 0755 "$SRC/deploy/install-bundle.sh" "$PREFIX/bin/install-bundle.sh"
if [ -e "$ETC/serve.env" ]; then
  cmp -s "$SRC/deploy/serve.env" "$ETC/serve.env" ||
    say "kept your $ETC/serve.env (compare it with deploy/serve.env for new settings)"
else
  act install -m 0644 "$SRC/deploy/serve.env" "$ETC/serve.env"
  $DRY || say "wrote $ETC/serve.env"
fi
act install -m 0644 "$SRC/deploy/swapvae-serve.service" "$UNITS/swapvae-serve.service"
if $real && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  act systemctl daemon-reload
fi

if $DRY; then
  say "dry run done: nothing was changed"
elif [ -L "$PREFIX/bundles/current" ]; then
  say "done; the service serves $(readlink "$PREFIX/bundles/current"): systemctl restart swapvae-serve to run the new code"
else
  say "done. Next: $PREFIX/bin/install-bundle.sh BUNDLE_DIR, then systemctl enable --now swapvae-serve"
fi
