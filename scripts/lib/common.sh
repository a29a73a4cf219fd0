# shellcheck shell=bash
# Shared helpers for scripts/kafka, scripts/registry, scripts/postgres and scripts/test.
# Sourced, not executed. All human-readable messages go to stderr so that callers can
# capture a service's address from stdout: addr=$(scripts/kafka start)

if [ -z "${HOME:-}" ]; then
  HOME="$(getent passwd "$(id -u)" | cut -d: -f6)"
  export HOME
fi
BANK_CACHE_DIR="${BANK_CACHE_DIR:-$HOME/.cache/bank-es}"
BANK_STATE_DIR="${BANK_STATE_DIR:-$HOME/.local/state/bank-es}"

_BANK_TAG="${_BANK_TAG:-$(basename "$0")}"

log()  { printf '[%s] %s\n' "$_BANK_TAG" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$_BANK_TAG" "$*" >&2; }
die()  { printf '[%s] ERROR: %s\n' "$_BANK_TAG" "$*" >&2; exit 1; }

# apt-get install, non-interactive, with a single `apt-get update` first.
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; please install: $*"
  [ "$(id -u)" -eq 0 ] || die "need root to apt-get install $* (or install it yourself)"
  log "installing Debian packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "$@" >&2 || die "apt-get install $* failed"
}

java_major() {
  java -version 2>&1 | awk -F'"' '/version/ { split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit }'
}

ensure_java() {
  if ! command -v java >/dev/null 2>&1; then
    apt_install openjdk-17-jre-headless
  fi
  local major
  major="$(java_major)"
  { [ -n "$major" ] && [ "$major" -ge 17 ]; } || die "Java >= 17 required (found: ${major:-none})"
}

ensure_mvn() {
  ensure_java
  command -v mvn >/dev/null 2>&1 || apt_install maven
}

ensure_curl() {
  command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates
}

# pid_alive PIDFILE PATTERN -> 0 if the pid in PIDFILE is alive and its command line
# contains PATTERN (guards against pid reuse after a reboot / crash).
pid_alive() {
  local pidfile="$1" pattern="$2" pid
  [ -f "$pidfile" ] || return 1
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern"
}

# port_in_use PORT -> 0 if something listens on 127.0.0.1:PORT
port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# stop_pid PIDFILE PATTERN TIMEOUT_SECONDS NAME: SIGTERM, wait, then SIGKILL.
stop_pid() {
  local pidfile="$1" pattern="$2" timeout="$3" name="$4" pid i
  if ! pid_alive "$pidfile" "$pattern"; then
    rm -f "$pidfile"
    log "$name is not running"
    return 0
  fi
  pid="$(cat "$pidfile")"
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 5; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    warn "$name did not stop within ${timeout}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$pidfile"
  log "$name stopped"
}

# Prints the last lines of a log file to stderr.
show_log_tail() {
  local file="$1" n="${2:-40}"
  if [ -f "$file" ]; then
    printf -- '----- last %s lines of %s -----\n' "$n" "$file" >&2
    tail -n "$n" "$file" >&2 || true
    printf -- '----- end of %s -----\n' "$file" >&2
  fi
}

# The native build dependencies of the Rust workspace: librdkafka is compiled from source by the
# rdkafka crate (cmake, a C/C++ compiler, OpenSSL, zlib; its cmake build includes curl's headers).
ensure_build_deps() {
  local missing=() pkg
  for pkg in cmake g++ make pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
  if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    source "$HOME/.cargo/env"
  fi
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) first"
}

# Headless Chromium and its WebDriver (Debian's chromium, chromium-driver) for the explorer's browser
# test (projection-service/tests/it/explorer.rs), which fails under CI=true without them.
ensure_browser() {
  local missing=() pkg
  for pkg in chromium chromium-driver; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] || [ "${CI:-}" = true ]; then
      apt_install "${missing[@]}"
    else
      warn "not installing ${missing[*]} (not root): the explorer's browser test will be skipped"
      return 0
    fi
  fi
  [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] \
    || die "chromium or chromedriver missing after installing ${missing[*]:-nothing}"
}

# promtool (Debian's prometheus package) for the tests that pipe /metrics into
# `promtool check metrics`; they fail under CI=true without it.
ensure_promtool() {
  command -v promtool >/dev/null 2>&1 && return 0
  if [ "$(id -u)" -eq 0 ] || [ "${CI:-}" = true ]; then
    apt_install prometheus
  else
    warn "not installing prometheus (not root): the promtool checks of /metrics will be skipped"
    return 0
  fi
  command -v promtool >/dev/null 2>&1 || die "promtool missing after installing prometheus"
}

# schemathesis (from PyPI, in a venv of its own) for scripts/api-check.
SCHEMATHESIS_SPEC="schemathesis>=4.32,<5"
SCHEMATHESIS_VENV="$BANK_CACHE_DIR/schemathesis-venv"

# ensure_schemathesis -> 0 when $SCHEMATHESIS_VENV/bin/st works (installing it if needed), 1 when it
# cannot be installed (no python3, venv or pip).
ensure_schemathesis() {
  if [ -x "$SCHEMATHESIS_VENV/bin/st" ] && "$SCHEMATHESIS_VENV/bin/st" --version >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then
      apt_install python3 python3-venv python3-pip
    else
      warn "python3 with venv is needed to install schemathesis"
      return 1
    fi
  fi
  log "installing $SCHEMATHESIS_SPEC into $SCHEMATHESIS_VENV"
  rm -rf "$SCHEMATHESIS_VENV"
  mkdir -p "$BANK_CACHE_DIR"
  if ! python3 -m venv "$SCHEMATHESIS_VENV" >&2 \
      || ! "$SCHEMATHESIS_VENV/bin/pip" install --quiet --disable-pip-version-check "$SCHEMATHESIS_SPEC" >&2; then
    warn "installing $SCHEMATHESIS_SPEC failed"
    rm -rf "$SCHEMATHESIS_VENV"
    return 1
  fi
}
