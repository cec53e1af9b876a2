# shellcheck shell=bash
#
# deploy/lib/services.sh -- make sure PostgreSQL and a JetStream-enabled
# nats-server are reachable, installing (apt) and starting them if they are not.
#
# Source this file; it only defines functions (no side effects, does not change
# shell options) and works with or without `set -euo pipefail` in the caller.
#
#   ensure_postgres   PGHOST_TCP (default 127.0.0.1), PGPORT (default 5432); then,
#                     if psql is there, checks that the application's default URL
#                     (below) can log in, and warns with the fix when it cannot
#   ensure_nats       NATS_HOST  (default 127.0.0.1), NATS_PORT (default 4222)
#   ensure_services   both of the above
#   ensure_browser    Debian's chromium and chromium-driver (/usr/bin/chromium and
#                     /usr/bin/chromedriver), for the dashboard's browser tests
#                     (tests/tests/dashboard.rs)
#
# Optional knobs (mostly useful for testing on a machine that already runs the
# default services):
#   SAGA_PG_CLUSTER   name of the Debian cluster to create/start when no
#                     cluster is configured for PGPORT (default: main)
#   SAGA_PG_LIBDIR    where server binaries live (default: /usr/lib/postgresql)
#   SAGA_PG_ETCDIR    where cluster configs live (default: /etc/postgresql)
#   SAGA_NATS_BIN     nats-server binary (default: /usr/sbin/nats-server, then
#                     whatever `nats-server` is on PATH)
#
# The application connects with postgres://postgres:postgres@HOST:PORT/<db>.
# Whenever this library installs or starts PostgreSQL itself it sets the
# password of the `postgres` role to `postgres`, so that URL works with both
# trust and scram-sha-256 (Debian's default for TCP on localhost) pg_hba rules.
#
# nats-server: when this library installs the Debian package on a host that runs
# systemd, apt enables and starts the package's nats-server.service, which listens
# on 127.0.0.1:4222 *without* JetStream (config /etc/nats-server.conf). This
# library then stops and disables that unit (systemctl disable --now nats-server)
# and starts its own `nats-server -js` instead: as root with start-stop-daemon
# (store /var/lib/nats-server, log /var/log/nats-server.log), otherwise detached
# with setsid/nohup (store and log under $XDG_DATA_HOME/saga-orchestrator, i.e.
# ~/.local/share/saga-orchestrator). A server without JetStream that was already
# running is never touched: the error says what it is and how to fix it.

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

log() {
    printf '==> %s\n' "$*" >&2
}

# Print an error to stderr; always returns 1.
_svc_err() {
    printf '==> ERROR: %s\n' "$*" >&2
    return 1
}

_svc_is_root() {
    [[ "$(id -u)" -eq 0 ]]
}

# Does this host run systemd (not, e.g., a container without an init system)?
_svc_have_systemd() {
    [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1
}

# Pid of the process listening on TCP port $1 (from ss; nothing when ss is
# missing or does not show the owner, e.g. another user's process when not root).
_svc_port_pid() {
    command -v ss >/dev/null 2>&1 || return 0
    ss -ltnpH "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2 || true
}

# A directory for this user's data (nats store and log when not root); works
# with HOME unset (e.g. under some service managers) and `set -u`.
_svc_data_dir() {
    if [[ -n "${XDG_DATA_HOME:-}" ]]; then
        printf '%s\n' "$XDG_DATA_HOME/saga-orchestrator"
        return 0
    fi
    local home=${HOME:-}
    if [[ -z "$home" ]]; then
        home=$(getent passwd "$(id -u)" 2>/dev/null | cut -d: -f6) || home=""
    fi
    if [[ -n "$home" && -d "$home" && -w "$home" ]]; then
        printf '%s\n' "$home/.local/share/saga-orchestrator"
    else
        printf '%s\n' "${TMPDIR:-/tmp}/saga-orchestrator-$(id -u)"
    fi
}

# Run a command as root: directly when root, through sudo otherwise.
# $1 is a human description of what needs installing/running, for the error.
_svc_as_root() {
    local what=$1
    shift
    if _svc_is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        _svc_err "need root to $what, but not running as root and sudo is not available." \
            "Run as root, or do it yourself: $*"
    fi
}

# Is host a loopback/local name we can start a server for?
_svc_is_local_host() {
    case "$1" in
        127.* | localhost | ::1 | 0.0.0.0) return 0 ;;
        *) return 1 ;;
    esac
}

# Does a TCP connection to host:port succeed? (bash /dev/tcp, 2 s timeout)
_svc_tcp_open() {
    local host=$1 port=$2
    if command -v timeout >/dev/null 2>&1; then
        # shellcheck disable=SC2016 # expanded by the inner bash
        timeout 2 "${BASH:-bash}" -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" 2>/dev/null
    else
        ( exec 3<>"/dev/tcp/$host/$port" ) 2>/dev/null
    fi
}

# apt-get install the given packages (runs apt-get update first).
_svc_apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        _svc_err "apt-get not found; please install these packages yourself: $*"
        return 1
    fi
    if ! _svc_is_root && ! command -v sudo >/dev/null 2>&1; then
        _svc_err "cannot install $*: not running as root and sudo is not available." \
            "Install it as root (apt-get install -y --no-install-recommends $*) and re-run."
        return 1
    fi
    log "Installing $* with apt-get"
    _svc_as_root "install $*" env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=300 -q update || {
        _svc_err "'apt-get update' failed; install these packages yourself: $*"
        return 1
    }
    _svc_as_root "install $*" env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=300 -q install -y --no-install-recommends "$@" || {
        _svc_err "'apt-get install $*' failed; install these packages yourself and re-run."
        return 1
    }
}

# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------

_svc_pg_ready() {
    local host=$1 port=$2
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$host" -p "$port" -t 2 >/dev/null 2>&1
    else
        _svc_tcp_open "$host" "$port"
    fi
}

# Are PostgreSQL server binaries installed?
_svc_pg_have_server() {
    local libdir=${SAGA_PG_LIBDIR:-/usr/lib/postgresql} f
    for f in "$libdir"/*/bin/postgres; do
        [[ -x "$f" ]] && return 0
    done
    return 1
}

# Newest major version that has a config dir under /etc/postgresql and server
# binaries; falls back to the newest installed server binaries.
_svc_pg_version() {
    local libdir=${SAGA_PG_LIBDIR:-/usr/lib/postgresql}
    local etcdir=${SAGA_PG_ETCDIR:-/etc/postgresql}
    local d v candidates=() installed=()
    for d in "$libdir"/*/bin/postgres; do
        [[ -x "$d" ]] || continue
        v=${d#"$libdir"/}
        installed+=("${v%%/*}")
    done
    for v in "${installed[@]}"; do
        [[ -d "$etcdir/$v" ]] && candidates+=("$v")
    done
    ((${#candidates[@]})) || candidates=("${installed[@]}")
    ((${#candidates[@]})) || return 1
    printf '%s\n' "${candidates[@]}" | sort -V | tail -n 1
}

# Run psql (or any command) as the postgres OS user.
_svc_as_postgres() {
    if _svc_is_root; then
        (cd / && runuser -u postgres -- "$@")
    elif [[ "$(id -un)" == postgres ]]; then
        (cd / && "$@")
    elif command -v sudo >/dev/null 2>&1; then
        (cd / && sudo -u postgres "$@")
    else
        _svc_err "need root or sudo to run as the postgres user: $*"
    fi
}

_svc_pg_wait() {
    local host=$1 port=$2 timeout=${3:-60}
    local deadline=$((SECONDS + timeout))
    until _svc_pg_ready "$host" "$port"; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.2
    done
}

# Can the application's default URL, postgres://postgres:postgres@HOST:PORT/postgres,
# log in? Only warns (with the fix) when it cannot: DATABASE_URL may point elsewhere.
_svc_pg_check_app_login() {
    local host=$1 port=$2 urlhost=$1 url err
    command -v psql >/dev/null 2>&1 || return 0
    [[ "$host" == *:* ]] && urlhost="[$host]"
    url="postgres://postgres:postgres@$urlhost:$port/postgres"
    local cmd=(psql -X -q -w -d "$url" -c 'select 1')
    command -v timeout >/dev/null 2>&1 && cmd=(timeout 15 "${cmd[@]}")
    if err=$(PGCONNECT_TIMEOUT=5 "${cmd[@]}" 2>&1 >/dev/null); then
        return 0
    fi
    [[ -n "$err" ]] || err="(no answer within 15 s)"
    log "WARNING: PostgreSQL answers at $host:$port, but the URL the processes and tests use by default,"
    log "  $url, cannot log in:"
    printf '%s\n' "$err" | sed 's/^/      /' >&2
    log "  Either give the role postgres that password (and let pg_hba.conf accept password"
    log "  logins, scram-sha-256 or md5, from $host):"
    log "      sudo -u postgres psql -p $port -c \"ALTER USER postgres PASSWORD 'postgres'\""
    log "  or set DATABASE_URL (deploy/bench: BENCH_DATABASE_URL) to a URL that works."
    return 0
}

ensure_postgres() {
    _svc_ensure_postgres || return 1
    _svc_pg_check_app_login "${PGHOST_TCP:-127.0.0.1}" "${PGPORT:-5432}"
    return 0
}

_svc_ensure_postgres() {
    local host=${PGHOST_TCP:-127.0.0.1} port=${PGPORT:-5432}
    local cluster_name=${SAGA_PG_CLUSTER:-main}
    local etcdir=${SAGA_PG_ETCDIR:-/etc/postgresql}

    if _svc_pg_ready "$host" "$port"; then
        log "PostgreSQL is reachable at $host:$port"
        return 0
    fi
    log "PostgreSQL is not reachable at $host:$port"
    local changed=0

    if ! _svc_is_local_host "$host"; then
        _svc_err "PGHOST_TCP=$host is not a local address, so it cannot be started from here." \
            "Start PostgreSQL on $host:$port, or unset PGHOST_TCP to use a local server."
        return 1
    fi

    if ! _svc_pg_have_server; then
        log "No PostgreSQL server binaries found (${SAGA_PG_LIBDIR:-/usr/lib/postgresql}/*/bin/postgres)"
        _svc_apt_install postgresql || return 1
        changed=1
        _svc_pg_have_server || {
            _svc_err "package postgresql installed but no server binaries found under" \
                "${SAGA_PG_LIBDIR:-/usr/lib/postgresql}/*/bin/postgres"
            return 1
        }
    else
        log "PostgreSQL server binaries are installed"
    fi

    if ! command -v pg_lsclusters >/dev/null 2>&1; then
        _svc_err "pg_lsclusters/pg_ctlcluster not found (Debian package postgresql-common)." \
            "Install it (apt-get install postgresql-common) or start PostgreSQL on $host:$port yourself."
        return 1
    fi

    # Find the cluster to start: one already configured for $port, else
    # <newest version>/$cluster_name (created if it does not exist).
    # pg_lsclusters -h columns: version name port status owner datadir logfile
    local ver="" name="" cport="" status="" line
    line=$(pg_lsclusters -h 2>/dev/null | awk -v p="$port" '$3 == p' | sort -V | tail -n 1) || line=""
    if [[ -n "$line" ]]; then
        read -r ver name cport status _ <<<"$line"
        log "Found PostgreSQL cluster $ver/$name configured for port $port (status: $status)"
    else
        ver=$(_svc_pg_version) || {
            _svc_err "could not determine the installed PostgreSQL version"
            return 1
        }
        name=$cluster_name
        if [[ -d "$etcdir/$ver/$name" ]]; then
            line=$(pg_lsclusters -h 2>/dev/null | awk -v v="$ver" -v n="$name" '$1 == v && $2 == n')
            read -r _ _ cport status _ <<<"$line"
            _svc_err "PostgreSQL cluster $ver/$name exists but is configured for port ${cport:-?}, not $port." \
                "Either set PGPORT=${cport:-<its port>} (and the URLs accordingly), or create a cluster" \
                "for port $port: pg_createcluster -p $port $ver <name>"
            return 1
        fi
        log "No PostgreSQL cluster configured; creating cluster $ver/$name on port $port"
        _svc_as_root "create a PostgreSQL cluster" pg_createcluster -p "$port" "$ver" "$name" >&2 || {
            _svc_err "pg_createcluster -p $port $ver $name failed (see output above)." \
                "Fix the problem (e.g. locale settings) or start PostgreSQL on $host:$port yourself."
            return 1
        }
        status=down
        changed=1
    fi

    if [[ "$status" == online* ]]; then
        log "Cluster $ver/$name is already running; waiting for it to accept TCP connections"
    else
        log "Starting PostgreSQL cluster $ver/$name"
        _svc_as_root "start PostgreSQL" pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start || {
            _svc_err "pg_ctlcluster $ver $name start failed; see /var/log/postgresql/postgresql-$ver-$name.log"
            return 1
        }
        changed=1
    fi

    if ! _svc_pg_wait "$host" "$port" 60; then
        _svc_err "PostgreSQL cluster $ver/$name did not accept connections on $host:$port within 60 s." \
            "Check /var/log/postgresql/postgresql-$ver-$name.log and listen_addresses/port in" \
            "$etcdir/$ver/$name/postgresql.conf."
        return 1
    fi

    if ((changed == 0)); then
        # Someone else started it (it was just not ready yet): leave it alone.
        log "PostgreSQL $ver/$name is up at $host:$port"
        return 0
    fi
    # We installed and/or started this server: make the URL
    # postgres://postgres:postgres@host:port/... work under scram auth too.
    log "Setting password of PostgreSQL role 'postgres' (for password auth over TCP)"
    # Explicit -h/-U/-d: runuser keeps the caller's PG* environment.
    _svc_as_postgres psql -X -q -v ON_ERROR_STOP=1 \
        -h /var/run/postgresql -p "$port" -U postgres -d postgres \
        -c "ALTER USER postgres PASSWORD 'postgres'" || {
        _svc_err "could not set the postgres role's password. Run as the postgres user:" \
            "psql -p $port -c \"ALTER USER postgres PASSWORD 'postgres'\""
        return 1
    }
    log "PostgreSQL $ver/$name is up at $host:$port"
}

# ---------------------------------------------------------------------------
# NATS (JetStream)
# ---------------------------------------------------------------------------

# First line the server sends (INFO {...}), or nothing.
_svc_nats_info() {
    local host=$1 port=$2
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 3 "${BASH:-bash}" -c 'exec 3<>"/dev/tcp/$1/$2" && head -n 1 <&3' _ "$host" "$port" 2>/dev/null || true
}

_svc_nats_check_js() {
    local host=$1 port=$2 info
    command -v timeout >/dev/null 2>&1 || return 0
    info=$(_svc_nats_info "$host" "$port")
    if [[ "$info" != INFO* ]]; then
        log "WARNING: $host:$port accepts connections but sent no NATS INFO line within 3 s;" \
            "is it really a nats-server?"
        return 0
    fi
    if [[ "$info" != *'"jetstream":true'* ]]; then
        _svc_err "nats-server at $host:$port is running but JetStream is not enabled." \
            "Restart it with JetStream (nats-server -js -sd <store dir>), or point NATS_HOST/NATS_PORT" \
            "(and NATS_URL) at a JetStream-enabled server."
        if _svc_nats_unit_listens "$port"; then
            log "It is the nats-server.service of the Debian package nats-server (systemd; config"
            log "/etc/nats-server.conf), which runs without JetStream. Either stop and disable it, so that"
            log "this script starts its own JetStream server on the next run:"
            log "    sudo systemctl disable --now nats-server"
            log "or enable JetStream in /etc/nats-server.conf (a block"
            log "    jetstream { store_dir: \"<a directory the service may write>\" }"
            log ") and restart it: sudo systemctl restart nats-server"
        fi
        return 1
    fi
}

# Is the Debian package's systemd unit nats-server.service running, and (when
# ss can tell) is it the process listening on port $1?
_svc_nats_unit_listens() {
    local port=$1 main listener
    _svc_have_systemd || return 1
    systemctl is-active --quiet nats-server.service 2>/dev/null || return 1
    main=$(systemctl show -p MainPID --value nats-server.service 2>/dev/null) || main=""
    listener=$(_svc_port_pid "$port")
    if [[ -n "$listener" && -n "$main" && "$main" != 0 && "$listener" != "$main" ]]; then
        return 1
    fi
    return 0
}

# `apt-get install nats-server` on a host running systemd enables and starts the
# package's nats-server.service: it listens on 127.0.0.1:4222 without JetStream
# and would hold that port now and after every boot. Called only right after this
# library installed the package: stop and disable that unit.
_svc_nats_disable_packaged_unit() {
    local host=$1 port=$2
    _svc_have_systemd || return 0
    if ! systemctl is-active --quiet nats-server.service 2>/dev/null &&
        ! systemctl is-enabled --quiet nats-server.service 2>/dev/null; then
        return 0
    fi
    log "Stopping and disabling nats-server.service, which the package started without JetStream" \
        "(config /etc/nats-server.conf); a JetStream server is started instead"
    _svc_as_root "stop the packaged nats-server service" systemctl disable --now nats-server.service >&2 || {
        _svc_err "could not stop and disable nats-server.service (it runs without JetStream)." \
            "Run: sudo systemctl disable --now nats-server, and re-run."
        return 1
    }
    # `systemctl stop` waits for the process to exit; give the socket a moment all the same.
    local deadline=$((SECONDS + 10))
    while _svc_tcp_open "$host" "$port" && ((SECONDS < deadline)); do
        sleep 0.2
    done
}

_svc_nats_bin() {
    if [[ -n "${SAGA_NATS_BIN:-}" ]]; then
        printf '%s\n' "$SAGA_NATS_BIN"
    elif [[ -x /usr/sbin/nats-server ]]; then
        printf '%s\n' /usr/sbin/nats-server
    else
        command -v nats-server
    fi
}

ensure_nats() {
    local host=${NATS_HOST:-127.0.0.1} port=${NATS_PORT:-4222}

    if _svc_tcp_open "$host" "$port"; then
        _svc_nats_check_js "$host" "$port" || return 1
        log "nats-server is reachable at $host:$port"
        return 0
    fi
    log "nats-server is not reachable at $host:$port"

    if ! _svc_is_local_host "$host"; then
        _svc_err "NATS_HOST=$host is not a local address, so it cannot be started from here." \
            "Start nats-server -js on $host:$port, or unset NATS_HOST to use a local server."
        return 1
    fi

    local bin=""
    bin=$(_svc_nats_bin) || bin=""
    if [[ -z "$bin" || ! -x "$bin" ]]; then
        log "nats-server binary not found"
        _svc_apt_install nats-server || return 1
        bin=$(_svc_nats_bin) || bin=""
        if [[ -z "$bin" || ! -x "$bin" ]]; then
            _svc_err "package nats-server installed but /usr/sbin/nats-server not found"
            return 1
        fi
        # On systemd, apt has just started the package's server without JetStream.
        _svc_nats_disable_packaged_unit "$host" "$port" || return 1
    else
        log "Using nats-server binary $bin"
    fi

    # Something may listen there by now (a server the package started that could not be
    # stopped, or one started meanwhile): use it if it has JetStream, else say what it is.
    if _svc_tcp_open "$host" "$port"; then
        _svc_nats_check_js "$host" "$port" || return 1
        log "nats-server is reachable at $host:$port"
        return 0
    fi

    # The default port keeps the conventional paths; any other port gets its
    # own store/log/pidfile so it never shares a store with the default server.
    local suffix=""
    [[ "$port" == 4222 ]] || suffix="-$port"

    local store logfile pid="" child=0
    if _svc_is_root; then
        store=/var/lib/nats-server$suffix
        logfile=/var/log/nats-server$suffix.log
    else
        local base
        base=$(_svc_data_dir)
        store=$base/nats$suffix
        logfile=$base/nats$suffix.log
    fi
    mkdir -p "$store" "$(dirname "$logfile")" || {
        _svc_err "could not create $store or $(dirname "$logfile")"
        return 1
    }
    local args=(-a "$host" -p "$port" -js -sd "$store" -l "$logfile")
    log "Starting nats-server with JetStream on $host:$port (store $store, log $logfile)"

    if _svc_is_root && command -v start-stop-daemon >/dev/null 2>&1; then
        # --pidfile lets start-stop-daemon tell this instance apart from
        # nats-servers on other ports (with --exec alone it would see any
        # running nats-server and start nothing).
        local pidfile=/run/nats-server$suffix.pid
        start-stop-daemon --start --oknodo --background \
            --pidfile "$pidfile" --make-pidfile \
            --exec "$bin" -- "${args[@]}" || {
            _svc_err "start-stop-daemon failed to start $bin; see $logfile"
            return 1
        }
        pid=$(cat "$pidfile" 2>/dev/null) || pid=""
    else
        local detach=()
        command -v setsid >/dev/null 2>&1 && detach=(setsid)
        "${detach[@]}" nohup "$bin" "${args[@]}" </dev/null >/dev/null 2>&1 &
        pid=$!
        child=1
    fi

    local deadline=$((SECONDS + 30)) rc
    until _svc_tcp_open "$host" "$port"; do
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            rc=0
            if ((child)); then
                wait "$pid" || rc=$?
            fi
            if ((rc != 0 || !child)); then
                _svc_err "nats-server exited right after starting; last lines of $logfile:"
                tail -n 20 "$logfile" >&2 2>/dev/null || true
                return 1
            fi
            # exit status 0: setsid forked (caller has job control) and the
            # server runs on in the forked child; keep polling the port.
            pid=""
        fi
        if ((SECONDS >= deadline)); then
            _svc_err "nats-server did not accept connections on $host:$port within 30 s; see $logfile"
            tail -n 20 "$logfile" >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.2
    done
    _svc_nats_check_js "$host" "$port" || return 1
    log "nats-server (JetStream) is up at $host:$port"
}

ensure_services() {
    ensure_postgres || return 1
    ensure_nats || return 1
}

# ---------------------------------------------------------------------------
# Headless browser (the dashboard's end-to-end tests)
# ---------------------------------------------------------------------------

# The dashboard's tests drive Chromium through chromedriver (WebDriver). Both come from
# Debian's packages, installed together: chromedriver only drives the Chromium of its own
# version, and apt keeps the two in step (installing chromium-driver upgrades chromium to
# its version). E2E_CHROMIUM / E2E_CHROMEDRIVER (tests/src/browser.rs) point the tests at
# others; then nothing is installed.
ensure_browser() {
    local chromium=${E2E_CHROMIUM:-/usr/bin/chromium}
    local driver=${E2E_CHROMEDRIVER:-/usr/bin/chromedriver}
    if [[ -x "$chromium" && -x "$driver" ]]; then
        log "Chromium ($chromium) and chromedriver ($driver) are installed"
        return 0
    fi
    if [[ -n "${E2E_CHROMIUM:-}${E2E_CHROMEDRIVER:-}" ]]; then
        _svc_err "E2E_CHROMIUM=${E2E_CHROMIUM:-} / E2E_CHROMEDRIVER=${E2E_CHROMEDRIVER:-}:" \
            "$chromium or $driver is not an executable; fix the path or unset the variable."
        return 1
    fi
    log "Chromium or chromedriver is missing ($chromium, $driver)"
    _svc_apt_install chromium chromium-driver || return 1
    if [[ ! -x "$chromium" || ! -x "$driver" ]]; then
        _svc_err "packages chromium and chromium-driver installed but $chromium or $driver is missing"
        return 1
    fi
    log "Chromium and chromedriver are installed"
}
