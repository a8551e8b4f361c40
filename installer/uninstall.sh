#!/usr/bin/env bash
# Remove the SEPAS node agent service installed by install.sh.
#
#   sudo bash installer/uninstall.sh           # remove the program, keep config, keys, buffer
#   sudo bash installer/uninstall.sh --purge   # also delete config, keys, buffer and the user
#
# Without --purge, /etc/sepas-agent and the data directory (/var/lib/sepas-agent:
# buffer, node.key, buffer.key) stay, so that install.sh can bring the node back as it
# was, with records not yet uploaded.
set -euo pipefail

readonly SERVICE=sepas-agent
readonly SVC_USER=sepas
readonly VENV_DIR=/opt/sepas-agent
readonly ETC_DIR=/etc/sepas-agent
readonly CONFIG=$ETC_DIR/agent.toml
readonly DEFAULT_DATA_DIR=/var/lib/sepas-agent
readonly UNIT_FILE=/etc/systemd/system/$SERVICE.service
readonly LINK=/usr/local/bin/sepas-agent

usage() {
    cat <<EOF
Usage: sudo bash uninstall.sh [--purge [--yes]] [--root DIR]

Stop and disable the "$SERVICE" service and remove its unit, the virtualenv
$VENV_DIR and the command $LINK.
$ETC_DIR and the data directory ($DEFAULT_DATA_DIR: the buffer and the keys)
are kept unless --purge.

Options:
  --purge      also delete $ETC_DIR, the data directory (records not yet
               uploaded are lost, and the node key: the hub must register a new
               one), the unit's drop-ins and the '$SVC_USER' user
  --yes        with --purge, do not ask for confirmation on a terminal
  --root DIR   uninstall from the staging directory DIR (see install.sh --root):
               no systemctl, no userdel
  -h, --help   show this help

Examples:
  sudo bash installer/uninstall.sh
  sudo bash installer/uninstall.sh --purge
EOF
}

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
usage_error() {
    printf 'error: %s\n' "$*" >&2
    printf 'Run "bash uninstall.sh --help" for the options.\n' >&2
    exit 2
}

ROOT=""
PURGE=0
YES=0
while (($#)); do
    case $1 in
        --root)
            (($# >= 2)) || usage_error "--root needs a directory"
            ROOT=$2
            [[ -n $ROOT ]] || usage_error "--root needs a directory"
            shift 2
            ;;
        --root=*)
            ROOT=${1#*=}
            [[ -n $ROOT ]] || usage_error "--root needs a directory"
            shift
            ;;
        --purge) PURGE=1 && shift ;;
        --yes | -y) YES=1 && shift ;;
        -h | --help) usage && exit 0 ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done

R=""
STAGED=0
if [[ -n $ROOT ]]; then
    [[ -d $ROOT ]] || die "--root $ROOT: not a directory"
    R=$(cd -- "$ROOT" && pwd)
    [[ $R != / ]] || R=""
    STAGED=1
else
    ((EUID == 0)) || die "run this as root (sudo bash $0)"
fi
SYSTEMD_UP=0
((STAGED)) || [[ ! -d /run/systemd/system ]] || SYSTEMD_UP=1

# The data directory named in the config ([node] data_dir), read before the
# virtualenv goes; any Python >= 3.11 can read it, else the default.
data_dir() {
    local py
    for py in "$R$VENV_DIR/bin/python" python3 python3.13 python3.12 python3.11; do
        if command -v -- "$py" >/dev/null 2>&1 &&
            "$py" - "$R$CONFIG" "$ETC_DIR" "$DEFAULT_DATA_DIR" 2>/dev/null <<'PY'; then
import sys
import tomllib
from pathlib import PurePosixPath

path, config_dir, default = sys.argv[1:4]
try:
    with open(path, "rb") as f:
        node = tomllib.load(f).get("node", {})
except FileNotFoundError:
    node = {}
value = PurePosixPath(str(node.get("data_dir", default)))
print(value if value.is_absolute() else PurePosixPath(config_dir) / value)
PY
            return 0
        fi
    done
    printf '%s\n' "$DEFAULT_DATA_DIR"
}
DATA_DIR=$(data_dir)

if ((PURGE && !YES)) && [[ -t 0 ]]; then
    printf 'This deletes %s and %s: the buffer with any records not yet\n' "$R$ETC_DIR" "$R$DATA_DIR"
    printf 'uploaded, buffer.key and the node key. Type "purge" to go on: '
    read -r answer
    [[ $answer == purge ]] || die "not purged: nothing was changed"
fi

say "Service $SERVICE"
if ((STAGED)); then
    note "skipped (--root); would run: systemctl disable --now $SERVICE"
elif ((SYSTEMD_UP)); then
    if systemctl is-active --quiet "$SERVICE"; then
        systemctl stop "$SERVICE"
        note "stopped"
    fi
    if systemctl is-enabled --quiet "$SERVICE" 2>/dev/null; then
        systemctl disable --quiet "$SERVICE"
        note "disabled"
    fi
else
    note "systemd is not running: nothing to stop"
fi

say "Removing the program"
for path in "$R$UNIT_FILE" "$R$VENV_DIR"; do
    if [[ -e $path ]]; then
        rm -rf -- "$path"
        note "removed $path"
    fi
done
if [[ -L $R$LINK && $(readlink -- "$R$LINK") == "$VENV_DIR/bin/sepas-agent" ]]; then
    rm -f -- "$R$LINK"
    note "removed $R$LINK"
fi
if ((PURGE)) && [[ -d $R$UNIT_FILE.d ]]; then
    rm -rf -- "$R$UNIT_FILE.d"
    note "removed $R$UNIT_FILE.d (drop-ins)"
fi
if ((SYSTEMD_UP)); then
    systemctl daemon-reload
    systemctl reset-failed "$SERVICE" 2>/dev/null || true
fi

if ((PURGE)); then
    say "Purging config, keys and buffer"
    for path in "$R$DATA_DIR" "$R$ETC_DIR"; do
        if [[ -e $path ]]; then
            rm -rf -- "$path"
            note "deleted $path"
        fi
    done
    if ((STAGED)); then
        note "skipped (--root); would run: userdel $SVC_USER"
    elif id -u "$SVC_USER" >/dev/null 2>&1; then
        if userdel "$SVC_USER"; then
            note "deleted the user $SVC_USER"
        else
            warn "could not delete the user $SVC_USER"
        fi
    fi
else
    say "Kept (delete them with --purge)"
    for path in "$R$ETC_DIR" "$R$DATA_DIR"; do
        [[ ! -e $path ]] || note "$path"
    done
    note "install.sh brings the agent back with this config, these keys and this buffer"
fi
say "Done"
