#!/usr/bin/env bash
# Install or update the decoding service on a rig PC (deploy/README.md):
#   sudo deploy/install.sh                      # the runtime with onnxruntime ([cpu])
#   sudo SWAPVAE_EXTRA=gpu deploy/install.sh    # with onnxruntime-gpu alone ([gpu])
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
# Variables: SWAPVAE_EXTRA (cpu|gpu), SWAPVAE_PYTHON (python3), SWAPVAE_PIP_ARGS (extra pip
# arguments, split at spaces), SWAPVAE_USER (swapvae). SWAPVAE_ROOT=/some/dir installs the
# files under that directory instead of / and leaves the system alone (no user, no chown, no
# systemctl), root or not: the tests run it so.
set -euo pipefail

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
real=false  # true: a real install (root, no SWAPVAE_ROOT), which creates the user and sets owners
if [ -z "$ROOT" ]; then
  [ "$(id -u)" = 0 ] || die "run it as root (sudo), or set SWAPVAE_ROOT to install under another directory"
  real=true
fi
[ -f "$SRC/pyproject.toml" ] || die "$SRC is not a swapvae-bci checkout (no pyproject.toml)"

# 1. The service's user.
if $real; then
  if ! id -u "$SVC_USER" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /opt/swapvae --no-create-home --shell /usr/sbin/nologin \
      --comment "Swap-VAE decoding service" "$SVC_USER"
    say "created the system user $SVC_USER"
  fi
else
  say "under SWAPVAE_ROOT=$ROOT: no user $SVC_USER, no owners set, no systemctl"
fi

# 2. Directories. The service reads everything and writes nothing.
install -d -m 0755 "$PREFIX" "$PREFIX/bundles" "$PREFIX/bin" "$ETC" "$UNITS"
install -d -m 0750 "$ETC/keys"
if $real; then
  chown root:root "$PREFIX" "$PREFIX/bundles" "$PREFIX/bin" "$ETC"
  chown root:"$SVC_USER" "$ETC/keys"
fi

# 3. The venv, from a clean copy of the checkout: an in-tree build leaves build/ behind, and
# setuptools puts stale files from there into later wheels.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
  --exclude=./runs --exclude=./bundles --exclude=./results --exclude=__pycache__ -cf - . | tar -C "$stage" -xf -
if [ ! -x "$PREFIX/venv/bin/python" ]; then
  "$PYTHON" -m venv "$PREFIX/venv"
  say "created $PREFIX/venv ($("$PREFIX/venv/bin/python" --version))"
fi
pip=("$PREFIX/venv/bin/python" -m pip)
# One ONNX Runtime: both builds install the same module, so switching extras removes both first.
if "${pip[@]}" show "$OTHER" >/dev/null 2>&1; then
  say "removing $OTHER (switching to [$EXTRA])"
  "${pip[@]}" uninstall -y -q onnxruntime onnxruntime-gpu
fi
"${pip[@]}" install -q ${PIP_ARGS[@]+"${PIP_ARGS[@]}"} "${stage}[$EXTRA]"
say "installed $("${pip[@]}" show swapvae-bci | sed -n 's/^Version: /swapvae-bci /p') [$EXTRA] in $PREFIX/venv"

# 4. Scripts, settings and the unit.
install -m 0755 "$SRC/deploy/install-bundle.sh" "$PREFIX/bin/install-bundle.sh"
if [ -e "$ETC/serve.env" ]; then
  cmp -s "$SRC/deploy/serve.env" "$ETC/serve.env" ||
    say "kept your $ETC/serve.env (compare it with deploy/serve.env for new settings)"
else
  install -m 0644 "$SRC/deploy/serve.env" "$ETC/serve.env"
  say "wrote $ETC/serve.env"
fi
install -m 0644 "$SRC/deploy/swapvae-serve.service" "$UNITS/swapvae-serve.service"
if $real && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi

if [ -L "$PREFIX/bundles/current" ]; then
  say "done; the service serves $(readlink "$PREFIX/bundles/current"): systemctl restart swapvae-serve to run the new code"
else
  say "done. Next: $PREFIX/bin/install-bundle.sh BUNDLE_DIR, then systemctl enable --now swapvae-serve"
fi
