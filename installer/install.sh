#!/usr/bin/env bash
# Install or upgrade the SEPAS node agent as a systemd service.
#
#   sudo bash installer/install.sh            # install, or upgrade in place
#   bash installer/install.sh --help
#
# What it does, in order (each step says what it did):
#   1. checks for systemd Linux and Python >= 3.11 with venv;
#   2. creates the `sepas` system user (no login shell);
#   3. copies config/agent.example.toml to /etc/sepas-agent/agent.toml, never over an
#      existing one (0640, group sepas);
#   4. creates the data directory /var/lib/sepas-agent (0700, owned by sepas);
#   5. creates or upgrades the virtualenv /opt/sepas-agent and pip-installs the agent;
#   6. creates the node key as the sepas user if there is none (never replaces one);
#   7. renders installer/sepas-agent.service to /etc/systemd/system/ from the config
#      (writable paths; CAP_NET_BIND_SERVICE only for a listen port below 1024);
#   8. enables the service and (re)starts it; prints the public key for the hub.
# Running it again upgrades the agent and keeps the config, the keys and the buffer.
set -euo pipefail

readonly SERVICE=sepas-agent
readonly SVC_USER=sepas
readonly VENV_DIR=/opt/sepas-agent
readonly ETC_DIR=/etc/sepas-agent
readonly CONFIG=$ETC_DIR/agent.toml
readonly DEFAULT_DATA_DIR=/var/lib/sepas-agent
readonly UNIT_FILE=/etc/systemd/system/$SERVICE.service
readonly LINK=/usr/local/bin/sepas-agent

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE
readonly TEMPLATE=$HERE/sepas-agent.service

usage() {
    cat <<EOF
Usage: sudo bash install.sh [OPTIONS]

Install the SEPAS node agent as the systemd service "$SERVICE", or upgrade an
existing installation in place. The config ($CONFIG), the node key and the
buffer ($DEFAULT_DATA_DIR) are never overwritten.

Options:
  --source PATH      the agent to install: the project directory, or a wheel
                     (.whl) or sdist (.tar.gz) [default: the directory holding
                     installer/, i.e. $(cd "$HERE/.." && pwd)]
  --wheelhouse DIR   install offline: take the agent's dependencies from the wheel
                     files in DIR only (pip --no-index --find-links DIR)
  --python PY        the Python (>= 3.11) to build the virtualenv with
                     [default: python3, else python3.13, python3.12, python3.11]
  --no-start         enable the service but do not start or restart it
  --root DIR         install into the staging directory DIR instead of / (for
                     tests and image builds): every path is prefixed with DIR, no
                     user is created, systemctl is not called
  -h, --help         show this help

Examples:
  sudo bash installer/install.sh
  sudo bash installer/install.sh --source sepas_agent-0.1.0-py3-none-any.whl --wheelhouse ./wheels
  bash installer/install.sh --root /tmp/stage --no-start
EOF
}

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$1" >&2
    shift
    local line
    for line in "$@"; do printf '  hint: %s\n' "$line" >&2; done
    exit 1
}
usage_error() {
    printf 'error: %s\n' "$*" >&2
    printf 'Run "bash install.sh --help" for the options.\n' >&2
    exit 2
}

ORIG_ARGS=("$@")
ROOT=""
SOURCE=""
PYTHON=""
WHEELHOUSE=""
NO_START=0
while (($#)); do
    case $1 in
        --root | --source | --python | --wheelhouse)
            (($# >= 2)) || usage_error "$1 needs a value"
            [[ -n $2 ]] || usage_error "$1 needs a non-empty value"
            case $1 in
                --root) ROOT=$2 ;;
                --source) SOURCE=$2 ;;
                --python) PYTHON=$2 ;;
                --wheelhouse) WHEELHOUSE=$2 ;;
            esac
            shift 2
            ;;
        --root=* | --source=* | --python=* | --wheelhouse=*)
            value=${1#*=}
            [[ -n $value ]] || usage_error "${1%%=*} needs a non-empty value"
            case $1 in
                --root=*) ROOT=$value ;;
                --source=*) SOURCE=$value ;;
                --python=*) PYTHON=$value ;;
                --wheelhouse=*) WHEELHOUSE=$value ;;
            esac
            shift
            ;;
        --no-start) NO_START=1 && shift ;;
        -h | --help) usage && exit 0 ;;
        *) usage_error "unknown argument: $1" ;;
    esac
done

# R prefixes every path we write: "" for a real install, the staging dir under --root.
R=""
if [[ -n $ROOT ]]; then
    mkdir -p -- "$ROOT"
    R=$(cd -- "$ROOT" && pwd)
    [[ $R != / ]] || R=""
fi
STAGED=0
[[ -z $ROOT ]] || STAGED=1

PROBLEMS=()
problem() {
    warn "$1"
    PROBLEMS+=("$1")
}

# ---------------------------------------------------------------------- 1. the system
say "Checking the system"
OS_FAMILY=other
OS_NAME="unknown Linux"
if [[ -r /etc/os-release ]]; then
    # shellcheck disable=SC1091
    OS_NAME=$(. /etc/os-release && printf '%s' "${PRETTY_NAME:-${NAME:-Linux}}")
    # shellcheck disable=SC1091
    os_ids=$(. /etc/os-release && printf '%s %s' "${ID:-}" "${ID_LIKE:-}")
    case " $os_ids " in
        *" debian "* | *" ubuntu "*) OS_FAMILY=debian ;;
        *" rhel "* | *" fedora "* | *" centos "* | *" rocky "* | *" almalinux "*) OS_FAMILY=rhel ;;
    esac
fi
note "system: $OS_NAME"
[[ $OS_FAMILY != other ]] || warn "not a Debian/Ubuntu or RHEL-family system; continuing"

if ((!STAGED)); then
    ((EUID == 0)) || die "run this as root" "sudo bash $0 ${ORIG_ARGS[*]}"
    command -v systemctl >/dev/null 2>&1 ||
        die "systemctl not found: this installer is for systemd Linux" \
            "to stage files without systemd, use --root DIR"
fi
SYSTEMD_UP=0
[[ -d /run/systemd/system ]] && SYSTEMD_UP=1
if ((!STAGED && !SYSTEMD_UP)); then
    warn "systemd is not running here (a container?): the unit is installed but not enabled or started"
fi

python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}
python_hints() {
    case $OS_FAMILY in
        debian) printf '%s\n' \
            "Debian 12 / Ubuntu 24.04: apt-get install python3 python3-venv" \
            "Ubuntu 22.04: apt-get install python3.11 python3.11-venv, then --python python3.11" ;;
        rhel) printf '%s\n' \
            "RHEL/Rocky/Alma 8 and 9: dnf install python3.11 python3.11-pip, then --python python3.11" ;;
        *) printf '%s\n' "install Python 3.11 or newer with its venv module, then --python PATH" ;;
    esac
}
PY=""
if [[ -n $PYTHON ]]; then
    command -v -- "$PYTHON" >/dev/null 2>&1 || die "--python $PYTHON: not found"
    python_ok "$PYTHON" || die "--python $PYTHON is older than Python 3.11"
    PY=$PYTHON
else
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            PY=$candidate
            break
        fi
    done
    if [[ -z $PY ]]; then
        mapfile -t hints < <(python_hints)
        die "no Python 3.11 or newer found (python3 is $(python3 -V 2>&1 || echo missing))" "${hints[@]}"
    fi
fi
PY_VERSION=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
note "python: $(command -v -- "$PY") ($PY_VERSION)"
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    case $OS_FAMILY in
        debian) die "Python's venv module is missing" "apt-get install python3-venv python$PY_VERSION-venv" ;;
        rhel) die "Python's venv module is missing" "dnf install python$PY_VERSION python$PY_VERSION-pip" ;;
        *) die "Python's venv module (with ensurepip) is missing" "install your distribution's python3-venv package" ;;
    esac
fi

if [[ -z $SOURCE ]]; then
    SOURCE=$HERE/..
fi
[[ -e $SOURCE ]] || die "--source $SOURCE: no such file or directory"
if [[ -d $SOURCE ]]; then
    SOURCE=$(cd -- "$SOURCE" && pwd)
    [[ -f $SOURCE/pyproject.toml ]] || die "--source $SOURCE has no pyproject.toml: not the sepas-agent project"
else
    SOURCE=$(cd -- "$(dirname -- "$SOURCE")" && pwd)/$(basename -- "$SOURCE")
    case $SOURCE in
        *.whl | *.tar.gz | *.zip) ;;
        *) die "--source $SOURCE: expected the project directory, a .whl or a .tar.gz" ;;
    esac
fi
note "source: $SOURCE"
# The example config of the same version as the code: from the source directory, else
# from the release this script is part of.
EXAMPLE=$HERE/../config/agent.example.toml
if [[ -d $SOURCE && -f $SOURCE/config/agent.example.toml ]]; then
    EXAMPLE=$SOURCE/config/agent.example.toml
fi
if [[ -n $WHEELHOUSE ]]; then
    [[ -d $WHEELHOUSE ]] || die "--wheelhouse $WHEELHOUSE: not a directory"
    WHEELHOUSE=$(cd -- "$WHEELHOUSE" && pwd)
    note "offline: dependencies from $WHEELHOUSE only"
fi
[[ -f $TEMPLATE ]] || die "$TEMPLATE is missing: run install.sh from an unpacked sepas-agent release"
[[ -f $EXAMPLE ]] || die "$EXAMPLE is missing: run install.sh from an unpacked sepas-agent release"
if ((STAGED)); then
    note "staging into $R (--root): no user is created, systemctl is not called"
fi

# Never let the caller's environment redirect where keys and the buffer go.
unset SEPAS_AGENT_CONFIG SEPAS_AGENT_DATA_DIR

# ---------------------------------------------------------------------- 2. the user
say "Service user '$SVC_USER'"
NOLOGIN=/usr/sbin/nologin
[[ -x $NOLOGIN ]] || NOLOGIN=/sbin/nologin
group_opt=(--user-group)
# A group of that name without the user (left by an old install): join it.
! getent group "$SVC_USER" >/dev/null 2>&1 || group_opt=(--gid "$SVC_USER")
useradd_cmd=(useradd --system "${group_opt[@]}" --home-dir "$DEFAULT_DATA_DIR" --no-create-home
    --shell "$NOLOGIN" --comment "SEPAS node agent" "$SVC_USER")
if id -u "$SVC_USER" >/dev/null 2>&1; then
    note "exists (uid $(id -u "$SVC_USER"))"
elif ((STAGED)); then
    note "skipped (--root); would run: $(printf '%q ' "${useradd_cmd[@]}")"
else
    "${useradd_cmd[@]}"
    note "created: $(printf '%q ' "${useradd_cmd[@]}")"
fi
HAVE_USER=0
id -u "$SVC_USER" >/dev/null 2>&1 && HAVE_USER=1
CAN_CHOWN=0
((EUID == 0 && HAVE_USER)) && CAN_CHOWN=1
((STAGED)) || ((HAVE_USER)) || die "the user '$SVC_USER' does not exist and could not be created"

# owner USER:GROUP PATH...: chown when we can (root, and the user exists).
owner() {
    local who=$1
    shift
    if ((CAN_CHOWN)); then chown -- "$who" "$@"; fi
}

# -------------------------------------------------------------------- 3. the config
say "Config $R$CONFIG"
install -d -m 0750 -- "$R$ETC_DIR"
owner "root:$SVC_USER" "$R$ETC_DIR"
install -m 0640 -- "$EXAMPLE" "$R$ETC_DIR/agent.example.toml"
owner "root:$SVC_USER" "$R$ETC_DIR/agent.example.toml"
if [[ -e $R$CONFIG ]]; then
    note "exists: kept as it is ($R$ETC_DIR/agent.example.toml shows this version's options)"
else
    install -m 0640 -- "$EXAMPLE" "$R$CONFIG"
    owner "root:$SVC_USER" "$R$CONFIG"
    note "created from the example: edit [node] id, [hub] url and the [[adapters]]"
fi
UNEDITED=0
cmp -s -- "$EXAMPLE" "$R$CONFIG" && UNEDITED=1

# What the unit needs from the config: the data directory, writable directories,
# listen addresses (low ports need CAP_NET_BIND_SERVICE). Read with tomllib only, so
# that a config the agent would refuse still gets a unit; `config check` says why.
config_facts() {
    "$PY" - "$R$CONFIG" "$ETC_DIR" "$DEFAULT_DATA_DIR" <<'PY'
import sys
import tomllib
from pathlib import PurePosixPath

path, config_dir, default_data_dir = sys.argv[1:4]


def out(key, value):
    print(f"{key}={str(value).replace(chr(10), ' ')}")


def absolute(value):
    p = PurePosixPath(str(value))
    return p if p.is_absolute() else PurePosixPath(config_dir) / p


def table(value):
    return value if isinstance(value, dict) else {}


try:
    with open(path, "rb") as f:
        data = tomllib.load(f)
except (OSError, tomllib.TOMLDecodeError) as e:
    out("error", e)
    data = {}
node = table(data.get("node"))
data_dir = absolute(node.get("data_dir", default_data_dir))
out("node_id", node.get("id", "?"))
out("data_dir", data_dir)
key_file = node.get("key_file")
out("node_key", absolute(key_file) if key_file else data_dir / "node.key")
buffer_key = table(data.get("buffer")).get("key_file")
out("explicit_keys", int(bool(key_file or buffer_key)))
listens = [("telemetry", table(data.get("telemetry")).get("listen", "127.0.0.1:9466"))]
# The listen defaults of adapters/hl7_mllp/settings.py and adapters/dicom/settings.py.
default_listen = {"hl7-mllp": "0.0.0.0:2575", "dicom": "0.0.0.0:11113"}
adapters = data.get("adapters")
for a in adapters if isinstance(adapters, list) else []:
    a = table(a)
    if a.get("enabled", True) is False:
        continue
    listen = a.get("listen", default_listen.get(a.get("kind")))
    if isinstance(listen, str):
        listens.append((a.get("name", "?"), listen))
    if a.get("kind") == "hl7-files" and a.get("directory"):
        directory = absolute(a["directory"])
        out("rw", directory)
        for key in ("done_dir", "failed_dir"):
            if a.get(key):
                out("rw", absolute(a[key]))
for name, listen in listens:
    if not isinstance(listen, str):
        continue
    out("listen", f"{name} {listen}")
    port = listen.rpartition(":")[2]
    if port.isdigit() and int(port) < 1024:
        out("low_port", f"{name} {listen}")
PY
}
DATA_DIR=$DEFAULT_DATA_DIR
NODE_ID="?"
NODE_KEY=$DEFAULT_DATA_DIR/node.key
EXPLICIT_KEYS=0
RW_PATHS=()
LISTENS=()
LOW_PORTS=()
while IFS= read -r line; do
    value=${line#*=}
    case $line in
        error=*) problem "$R$CONFIG is not valid TOML ($value): the unit uses the defaults" ;;
        node_id=*) NODE_ID=$value ;;
        data_dir=*) DATA_DIR=$value ;;
        node_key=*) NODE_KEY=$value ;;
        explicit_keys=*) EXPLICIT_KEYS=$value ;;
        rw=*) RW_PATHS+=("$value") ;;
        listen=*) LISTENS+=("$value") ;;
        low_port=*) LOW_PORTS+=("$value") ;;
    esac
done < <(config_facts)

# ---------------------------------------------------------------- 4. the data directory
say "Data directory $R$DATA_DIR"
# It is made 0700 and given to the service user: refuse what looks like a system
# directory, so that a typo in [node] data_dir cannot take over /var/lib or /etc.
not_own_dir() {
    local d=${1%/}
    [[ $d == /?*/?* ]] || return 0 # relative, "/", or one level deep (/srv, /data)
    case $d in
        /etc/* | /proc/* | /sys/* | /dev/* | /run/* | /boot/* | "$VENV_DIR" | "$VENV_DIR"/*) return 0 ;;
        /home/* | /root/* | /tmp/* | /var/tmp/*) return 0 ;; # hidden from the service
        /*/*/*) return 1 ;;                                  # a directory of its own
        /var/* | /usr/*) return 0 ;;                         # /var/lib, /usr/local
    esac
    return 1
}
if not_own_dir "$DATA_DIR"; then
    die "[node] data_dir = $DATA_DIR in $CONFIG: not usable as the agent's own directory" \
        "use a directory for the agent alone, e.g. $DEFAULT_DATA_DIR: it is made 0700 and owned by $SVC_USER," \
        "and the service cannot see /home, /root or /tmp (ProtectHome=yes, PrivateTmp=yes)"
fi
if [[ -d $R$DATA_DIR ]]; then
    note "exists: kept (buffer and keys untouched)"
else
    mkdir -p -- "$R$DATA_DIR"
    note "created"
fi
chmod 0700 -- "$R$DATA_DIR"
owner "$SVC_USER:$SVC_USER" "$R$DATA_DIR"
if ((CAN_CHOWN)); then
    note "mode 0700, owner $SVC_USER"
else
    note "mode 0700 (owner $(id -un): no '$SVC_USER' user to give it to, or not root)"
fi

# ------------------------------------------------------------- stop for the upgrade
WAS_ACTIVE=0
if ((!STAGED && SYSTEMD_UP)) && systemctl is-active --quiet "$SERVICE"; then
    say "Stopping the running service for the upgrade"
    systemctl stop "$SERVICE"
    WAS_ACTIVE=1
    note "stopped (it finishes or releases in-flight work first)"
fi

# ---------------------------------------------------------------- 5. the virtualenv
VENV=$R$VENV_DIR
AGENT=$VENV/bin/sepas-agent
say "Virtualenv $VENV"
OLD_VERSION=""
CREATED_VENV=0
if [[ -e $VENV ]]; then
    [[ -f $VENV/pyvenv.cfg ]] ||
        die "$VENV exists but is not a virtualenv" "move it away, then run install.sh again"
    if ! python_ok "$VENV/bin/python"; then
        note "its Python is broken or too old (was the system Python upgraded?): recreating it"
        rm -rf -- "$VENV"
    fi
fi
if [[ -e $VENV ]]; then
    OLD_VERSION=$("$AGENT" --version 2>/dev/null || true)
    venv_py=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    note "exists${OLD_VERSION:+ ($OLD_VERSION)}, Python $venv_py: upgrading in place"
    [[ $venv_py == "$PY_VERSION" ]] ||
        note "(it keeps Python $venv_py; for $PY_VERSION, run uninstall.sh, then install.sh: data is kept)"
else
    mkdir -p -- "$(dirname -- "$VENV")"
    if ! "$PY" -m venv "$VENV"; then
        rm -rf -- "$VENV"
        mapfile -t hints < <(python_hints)
        die "could not create the virtualenv with $PY -m venv" "${hints[@]}"
    fi
    CREATED_VENV=1
    note "created with $PY"
fi
# The service runs the venv's Python as the service user with ProtectHome=yes: a Python
# under a home directory (pyenv, a user's build) cannot work there.
real_py=$(readlink -f -- "$VENV/bin/python")
py_hint="use a system Python instead, e.g. --python /usr/bin/python3 (or python3.11)"
case $real_py in
    /home/* | /root/* | /run/user/*)
        if ((STAGED)); then
            warn "the virtualenv's Python is $real_py, under a home directory: a real install needs a system Python"
        else
            ((!CREATED_VENV)) || rm -rf -- "$VENV"
            die "the virtualenv's Python is $real_py, under a home directory: the service cannot run it (ProtectHome=yes)" "$py_hint"
        fi
        ;;
esac
if ((!STAGED)) && ! runuser -u "$SVC_USER" -- "$VENV/bin/python" -c '' 2>/dev/null; then
    ((!CREATED_VENV)) || rm -rf -- "$VENV"
    die "the '$SVC_USER' user cannot run $VENV/bin/python ($real_py)" "$py_hint"
fi
pip_args=(--disable-pip-version-check --no-input --quiet --upgrade)
[[ -z $WHEELHOUSE ]] || pip_args+=(--no-index --find-links "$WHEELHOUSE")
pip_hints=("no access to PyPI? build a wheelhouse elsewhere and use --wheelhouse DIR (installer/README.md)"
    "a local PyPI mirror: export PIP_INDEX_URL=https://mirror.example/simple, then run install.sh again")
note "pip install $SOURCE (this takes a minute)"
if ! "$VENV/bin/python" -m pip install "${pip_args[@]}" "$SOURCE"; then
    ((!CREATED_VENV)) || rm -rf -- "$VENV"
    die "pip could not install $SOURCE" "${pip_hints[@]}"
fi
if [[ -f $SOURCE && -n $OLD_VERSION ]]; then
    # pip skips a wheel or sdist whose version is already installed: replace it anyway.
    "$VENV/bin/python" -m pip install "${pip_args[@]}" --no-deps --force-reinstall "$SOURCE" ||
        die "pip could not reinstall $SOURCE" "${pip_hints[@]}"
fi
NEW_VERSION=$("$AGENT" --version) || die "$AGENT does not run after the install"
if [[ -n $OLD_VERSION ]]; then
    note "installed $NEW_VERSION (was: $OLD_VERSION)"
else
    note "installed $NEW_VERSION"
fi
mkdir -p -- "$R$(dirname -- "$LINK")"
if [[ -L $R$LINK || ! -e $R$LINK ]]; then
    ln -sfn -- "$VENV_DIR/bin/sepas-agent" "$R$LINK"
    note "command: $LINK -> $VENV_DIR/bin/sepas-agent"
else
    warn "$R$LINK exists and is not a symlink: left alone; use $VENV_DIR/bin/sepas-agent"
fi

# Commands of the installed agent, as the service user (staged: as ourselves, with the
# staged data directory).
agent_cmd() {
    if ((STAGED)); then
        SEPAS_AGENT_DATA_DIR=$R$DATA_DIR "$AGENT" "$@" --config "$R$CONFIG"
    else
        runuser -u "$SVC_USER" -- "$AGENT" "$@" --config "$CONFIG"
    fi
}

# -------------------------------------------------------------------------- 6. keys
say "Node key"
HAVE_KEY=0
if [[ -e $R$NODE_KEY ]]; then
    HAVE_KEY=1
    note "exists: kept ($R$NODE_KEY)"
elif ((STAGED && EXPLICIT_KEYS)); then
    note "skipped (--root): the config names its own key_file, outside the staging root"
elif init_out=$(agent_cmd keys init 2>&1 >/dev/null); then
    HAVE_KEY=1
    note "created $R$NODE_KEY (0600); back up $R$DATA_DIR/buffer.key and node.key"
    if ((STAGED)); then
        owner "$SVC_USER:$SVC_USER" "$R$NODE_KEY"
        [[ ! -e $R$DATA_DIR/buffer.key ]] || owner "$SVC_USER:$SVC_USER" "$R$DATA_DIR/buffer.key"
    fi
else
    printf '%s\n' "$init_out" >&2
    problem "could not create the node key (see above); fix the config, then run install.sh again"
fi

if check_out=$(agent_cmd config check 2>&1 >/dev/null); then
    note "config check: ${check_out##*$'\n'}"
else
    printf '%s\n' "$check_out" >&2
    problem "sepas-agent config check failed for $CONFIG (see above)"
fi

# ------------------------------------------------------------------------- 7. the unit
say "Unit $R$UNIT_FILE"
systemd_path() {
    # ReadWritePaths= takes a space-separated list; quote a path that has spaces.
    if [[ $1 == *" "* ]]; then printf '"%s"' "$1"; else printf '%s' "$1"; fi
}
rw=$(systemd_path "$DATA_DIR")
for p in "${RW_PATHS[@]}"; do
    rw+=" $(systemd_path "-$p")"
done
if ((${#LOW_PORTS[@]})); then
    caps="AmbientCapabilities=CAP_NET_BIND_SERVICE"$'\n'"CapabilityBoundingSet=CAP_NET_BIND_SERVICE"
else
    caps="CapabilityBoundingSet="
fi
template=$(<"$TEMPLATE")
template=${template#*$'\n'\[Unit\]$'\n'}
unit="# Generated by sepas-agent's install.sh from installer/sepas-agent.service
# and $CONFIG; install.sh rewrites it on every run. To change paths
# or ports, edit the config and run install.sh again. For other local settings
# use \`systemctl edit $SERVICE\` (a drop-in, which install.sh leaves alone).
[Unit]
$template"
unit=${unit//@VENV@/$VENV_DIR}
unit=${unit//@CONFIG@/$CONFIG}
unit=${unit//@USER@/$SVC_USER}
unit=${unit//@DATA_DIR@/$(systemd_path "$DATA_DIR")}
unit=${unit//@READ_WRITE_PATHS@/$rw}
unit=${unit//@CAPABILITIES@/$caps}
mkdir -p -- "$(dirname -- "$R$UNIT_FILE")"
if [[ -f $R$UNIT_FILE ]] && [[ $(<"$R$UNIT_FILE") == "$unit" ]]; then
    note "unchanged"
else
    tmp_unit=$(mktemp "$R$UNIT_FILE.XXXXXX")
    printf '%s\n' "$unit" >"$tmp_unit"
    chmod 0644 -- "$tmp_unit"
    mv -f -- "$tmp_unit" "$R$UNIT_FILE"
    note "written"
fi
note "writable: $rw"
if ((${#LOW_PORTS[@]})); then
    note "CAP_NET_BIND_SERVICE granted for port(s) below 1024: ${LOW_PORTS[*]}"
else
    note "no capabilities (no listen port below 1024)"
fi

# ---------------------------------------------------------------------- 8. the service
say "Service $SERVICE"
START=1
why_not=""
if ((NO_START)); then
    START=0 why_not="--no-start"
elif ((UNEDITED)); then
    START=0 why_not="$CONFIG is still the unedited example"
elif ((${#PROBLEMS[@]})); then
    START=0 why_not="of the problems above"
fi
if ((STAGED)); then
    would="systemctl daemon-reload && systemctl enable $SERVICE"
    ((!START)) || would+=" && systemctl restart $SERVICE"
    note "skipped (--root); would run: $would"
elif ((!SYSTEMD_UP)); then
    note "skipped: systemd is not running"
else
    systemctl daemon-reload
    systemctl enable --quiet "$SERVICE"
    note "enabled: starts at boot"
    if ((START)); then
        systemctl restart "$SERVICE"
        sleep 3
        if systemctl is-active --quiet "$SERVICE"; then
            note "running ($(systemctl show -p MainPID --value "$SERVICE" 2>/dev/null | sed 's/^/pid /'))"
        else
            journalctl -u "$SERVICE" -n 20 --no-pager >&2 || true
            problem "the service did not stay up; see: journalctl -u $SERVICE"
        fi
    else
        note "not started: $why_not"
        ((!WAS_ACTIVE)) || warn "it was running before the upgrade and is now stopped"
    fi
fi

# ------------------------------------------------------------------------ the summary
say "Public key of node $NODE_ID"
if ((HAVE_KEY)) && agent_cmd keys show; then
    note "register it at the hub: sepas-hub nodes add $NODE_ID --public-key FILE"
    note "(save the lines from -----BEGIN to -----END in FILE; show them again with: sepas-agent keys show)"
else
    note "no key to show yet"
fi
if ((${#LISTENS[@]})); then
    say "Listening addresses in the config (open the non-loopback ones to their senders)"
    for l in "${LISTENS[@]}"; do
        case ${l#* } in
            127.* | localhost:* | \[::1\]:*) note "$l (loopback: this host only)" ;;
            *) note "$l" ;;
        esac
    done
fi
if ((${#PROBLEMS[@]})); then
    say "Installed, with problems:"
    for p in "${PROBLEMS[@]}"; do note "- $p"; done
    exit 1
fi
say "Done"
if ((UNEDITED)); then
    note "next: edit $CONFIG ([node] id, [hub] url, [[adapters]]),"
    note "      check it with: sepas-agent config check"
    note "      then run install.sh again: it adapts the unit to the config and starts the service"
fi
note "logs: journalctl -u $SERVICE -f     status: sepas-agent status"
note "back up $DATA_DIR/buffer.key and $DATA_DIR/node.key"
