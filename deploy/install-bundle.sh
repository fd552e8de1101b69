#!/usr/bin/env bash
# Install a bundle and switch the service to it, atomically (deploy/README.md):
#   sudo install-bundle.sh BUNDLE_DIR       install a bundle written by `swapvae export`, serve it
#   sudo install-bundle.sh --activate NAME  serve an installed one again (a roll back)
#   install-bundle.sh --list                the installed bundles, the served one marked
#
# Bundles live in versioned directories beside the link the service serves
# (SWAPVAE_BUNDLE in serve.env, /opt/swapvae/bundles/current):
#   1. BUNDLE_DIR is copied to bundles/<name>-<UTC time> (a new directory: nothing that is
#      being served is ever written to);
#   2. `swapvae verify` loads the copy as the server would, with serve.env's provider and
#      --trust keys; a bundle it refuses is deleted and nothing else changes;
#   3. `current` is pointed at it by a rename (ln -s to a temporary name, then mv -T), so a
#      reader finds the old bundle or the new one, never neither;
#   4. systemctl reload swapvae-serve (SIGHUP: the server verifies the new bundle before it
#      switches), then the script waits until the service serves the new bundle. If it does
#      not, `current` is pointed back at the old one and the script fails.
#
# Variables (defaults for a rig): SWAPVAE_ROOT (prefix of every path, for tests),
# SWAPVAE_ENV (/etc/swapvae/serve.env), SWAPVAE_BIN (/opt/swapvae/venv/bin/swapvae),
# SWAPVAE_SYSTEMCTL (systemctl; empty: no reload), SWAPVAE_SERVICE (swapvae-serve),
# SWAPVAE_CHECK_ENDPOINT (where to see the switch; default: SWAPVAE_BIND on loopback; empty:
# no check), SWAPVAE_CHECK_WAIT (seconds, 30). From serve.env: SWAPVAE_CHECK_KEYS (for a
# service with CURVE: "SERVER_PUBLIC_KEY CLIENT_KEY_SECRET", a key pair on its --allow list).
set -euo pipefail

ROOT=${SWAPVAE_ROOT:-}
ENV_FILE=${SWAPVAE_ENV:-$ROOT/etc/swapvae/serve.env}
SWAPVAE=${SWAPVAE_BIN:-$ROOT/opt/swapvae/venv/bin/swapvae}
SYSTEMCTL=${SWAPVAE_SYSTEMCTL-systemctl}
SERVICE=${SWAPVAE_SERVICE:-swapvae-serve}
WAIT=${SWAPVAE_CHECK_WAIT:-30}

say() { echo "install-bundle.sh: $*"; }
die() { echo "install-bundle.sh: $*" >&2; exit 1; }
help() {
  cat <<'USAGE'
usage: install-bundle.sh [--dry-run] BUNDLE_DIR    install a bundle and switch the service to it
       install-bundle.sh [--dry-run] --activate NAME   serve an installed bundle again (roll back)
       install-bundle.sh --list                    the installed bundles, the served one marked *
  --dry-run   verify the bundle (read only) and print what would be copied, linked and reloaded;
              change nothing
  -h, --help  print this, change nothing
Environment: SWAPVAE_ROOT (prefix of every path: the test mode, deploy/README.md), SWAPVAE_ENV,
  SWAPVAE_BIN, SWAPVAE_SYSTEMCTL, SWAPVAE_SERVICE, SWAPVAE_CHECK_ENDPOINT, SWAPVAE_CHECK_WAIT
USAGE
}
usage() { help >&2; exit 2; }

# Options first, before anything is read or changed.
DRY=false
args=()
for arg in "$@"; do
  case $arg in
    -h | --help) help; exit 0 ;;
    --dry-run) DRY=true ;;
    --list | --activate) args+=("$arg") ;;
    -*) echo "install-bundle.sh: unknown option '$arg'" >&2; usage ;;
    *) args+=("$arg") ;;
  esac
done
set -- ${args[@]+"${args[@]}"}
[ $# -ge 1 ] || usage
[ -f "$ENV_FILE" ] || die "$ENV_FILE is missing (run install.sh first)"
# serve.env is written for systemd and sh alike: read what the service reads.
set -a
# shellcheck disable=SC1090
. "$ENV_FILE"
set +a
[ -n "${SWAPVAE_BUNDLE:-}" ] || die "$ENV_FILE sets no SWAPVAE_BUNDLE"
LINK=$ROOT$SWAPVAE_BUNDLE
BUNDLES=$(dirname "$LINK")
[ -d "$BUNDLES" ] || die "$BUNDLES is missing (run install.sh first)"
if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
  die "$LINK is a directory, not the link this script swaps: move it into $BUNDLES under a name of its own" \
      "(e.g. mv $LINK $BUNDLES/old) and install it from there"
fi

# The server's view of a bundle: its provider and trusted keys, from SWAPVAE_FLAGS.
verify_args=(--provider "${SWAPVAE_PROVIDER:-cpu}")
read -r -a flags <<< "${SWAPVAE_FLAGS:-}"
for ((i = 0; i < ${#flags[@]}; i++)); do
  case ${flags[i]} in
    --trust) verify_args+=(--trust "$ROOT${flags[i + 1]:-}"); i=$((i + 1)) ;;
    --trust=*) verify_args+=(--trust "$ROOT${flags[i]#--trust=}") ;;
  esac
done
if [ -z "${SWAPVAE_CHECK_ENDPOINT+set}" ]; then  # where a client reaches the service
  SWAPVAE_CHECK_ENDPOINT=${SWAPVAE_BIND:-tcp://127.0.0.1:5555}
  SWAPVAE_CHECK_ENDPOINT=${SWAPVAE_CHECK_ENDPOINT/\/\/\*:/\/\/127.0.0.1:}
  SWAPVAE_CHECK_ENDPOINT=${SWAPVAE_CHECK_ENDPOINT/\/\/0.0.0.0:/\/\/127.0.0.1:}
fi

check_args=()  # the check is a client of the service: with CURVE, one it lets in
if [ -n "${SWAPVAE_CHECK_KEYS:-}" ]; then
  read -r server_key client_secret extra <<< "$SWAPVAE_CHECK_KEYS"
  [ -n "${client_secret:-}" ] && [ -z "${extra:-}" ] ||
    die "SWAPVAE_CHECK_KEYS is \"SERVER_PUBLIC_KEY CLIENT_KEY_SECRET\", two paths: got '$SWAPVAE_CHECK_KEYS'"
  check_args=(--server-key "$ROOT$server_key" --client-secret "$ROOT$client_secret")
fi

served() { [ -L "$LINK" ] && readlink "$LINK" || echo "(none)"; }

# Point LINK at bundles/$1 in one rename.
swap() {
  local tmp="$BUNDLES/.current.$$"
  ln -sfn "$1" "$tmp"
  mv -T "$tmp" "$LINK"
}

reload() {  # $1: the bundle now linked, $2: the one before (may be empty)
  if [ -z "$SYSTEMCTL" ]; then
    say "not reloading (SWAPVAE_SYSTEMCTL is empty): the service serves $1 from its next start"
    return 0
  fi
  if ! "$SYSTEMCTL" is-active --quiet "$SERVICE"; then
    say "$SERVICE is not running: systemctl start $SERVICE serves $1"
    return 0
  fi
  "$SYSTEMCTL" reload "$SERVICE"
  [ -n "$SWAPVAE_CHECK_ENDPOINT" ] || { say "reloaded $SERVICE (not checked: SWAPVAE_CHECK_ENDPOINT is empty)"; return 0; }
  if "$SWAPVAE" verify "$LINK" "${verify_args[@]}" --endpoint "$SWAPVAE_CHECK_ENDPOINT" --wait "$WAIT" \
       "${check_args[@]}" >/dev/null; then
    say "$SERVICE serves $1"
    return 0
  fi
  if [ -n "$2" ]; then
    swap "$2"
    die "$SERVICE did not switch to $1 within ${WAIT} s (journalctl -u $SERVICE says why); current points at $2 again"
  fi
  die "$SERVICE did not switch to $1 within ${WAIT} s (journalctl -u $SERVICE says why)"
}

# One install at a time.
if ! $DRY && command -v flock >/dev/null; then
  exec 9>"$BUNDLES/.lock"
  flock -n 9 || die "another install-bundle.sh is running"
fi

case $1 in
  --list)
    now=$(served)
    for d in "$BUNDLES"/*; do
      [ -d "$d" ] && [ ! -L "$d" ] || continue  # bundles, not the link
      name=$(basename "$d")
      if [ "$name" = "$now" ]; then echo "* $name"; else echo "  $name"; fi
    done
    exit 0 ;;
  --activate)
    [ $# -eq 2 ] || usage
    name=${2%/}
    case $name in */* | . | .. | .*) die "--activate takes the name of a directory in $BUNDLES, not '$2'" ;; esac
    [ -d "$BUNDLES/$name" ] && [ ! -L "$BUNDLES/$name" ] || die "no bundle $name in $BUNDLES (--list shows them)"
    "$SWAPVAE" verify "$BUNDLES/$name" "${verify_args[@]}" >/dev/null ||
      die "refused $name: it does not load (see above); current still points at $(served)"
    prev=$(readlink "$LINK" 2>/dev/null || true)
    if $DRY; then
      say "dry run: $name loads; would point current at it (now ${prev:-nothing}) and reload $SERVICE"
      exit 0
    fi
    swap "$name"
    say "current -> $name (was ${prev:-nothing})"
    reload "$name" "$prev"
    exit 0 ;;
  -*) usage ;;
esac

[ $# -eq 1 ] || usage
src=${1%/}
[ -d "$src" ] || die "$src is not a directory"
[ -f "$src/manifest.json" ] || die "$src has no manifest.json (is it a bundle written by 'swapvae export'?)"
base=$(basename "$src")
base=${base//[^A-Za-z0-9._-]/_}
[ "$base" != current ] || base=bundle
base=${base#.}
stamped=${base:-bundle}-$(date -u +%Y%m%dT%H%M%SZ)
name=$stamped
n=1
while [ -e "$BUNDLES/$name" ] || [ -L "$BUNDLES/$name" ]; do n=$((n + 1)); name=$stamped-$n; done

if $DRY; then
  "$SWAPVAE" verify "$src" "${verify_args[@]}" ||
    die "refused $src: the server would not load it (see above); nothing changed"
  say "dry run: would copy $src to $BUNDLES/$name, verify the copy, point current at it" \
      "(now $(served)) and reload $SERVICE; nothing changed"
  exit 0
fi

# Copy under a hidden name, make it readable by the service's user, and verify it there: an
# interrupted or refused install never leaves a bundle under a real name.
stage=$(mktemp -d "$BUNDLES/.incoming.XXXXXX")
trap 'rm -rf "$stage"' EXIT
cp -R "$src/." "$stage/"
chmod -R u=rwX,go=rX "$stage"
[ "$(id -u)" != 0 ] || chown -R root:root "$stage"
say "verifying the copy of $src ($stage)"
if ! "$SWAPVAE" verify "$stage" "${verify_args[@]}"; then
  die "refused $src: the server would not load it (see above); nothing changed, current still points at $(served)"
fi
mv -T "$stage" "$BUNDLES/$name"
trap - EXIT
prev=$(readlink "$LINK" 2>/dev/null || true)
swap "$name"
say "installed $src as $BUNDLES/$name; current -> $name (was ${prev:-nothing})"
reload "$name" "$prev"
[ -z "$prev" ] || say "to roll back: install-bundle.sh --activate $prev"
