# shellcheck shell=bash
# The Python tools the test suite runs (sourced by deploy/test):
#   ensure_python_tools   schemathesis and openapi-spec-validator, pinned, in a virtual
#                         environment at target/tools/venv (tests/tests/openapi.rs runs them
#                         against the orchestrator's OpenAPI document). Installs Debian's
#                         python3 and python3-venv first when they are missing.
#
# Requires the helpers of deploy/lib/services.sh (log, _svc_err, _svc_apt_install).

SCHEMATHESIS_VERSION=4.32.5
OPENAPI_SPEC_VALIDATOR_VERSION=0.9.0

ensure_python_tools() {
    local venv=${E2E_TOOLS_VENV:-target/tools/venv}
    local want="schemathesis==$SCHEMATHESIS_VERSION openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION"
    if [[ -x "$venv/bin/schemathesis" && -x "$venv/bin/openapi-spec-validator" ]] \
        && [[ "$(cat "$venv/.pinned" 2>/dev/null)" == "$want" ]]; then
        log "schemathesis and openapi-spec-validator are installed ($venv)"
        return 0
    fi
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        log "python3 with venv is missing"
        _svc_apt_install python3 python3-venv || return 1
    fi
    log "Installing $want into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || { _svc_err "cannot create a virtual environment at $venv"; return 1; }
    # shellcheck disable=SC2086 # two pinned requirements
    "$venv/bin/pip" install --quiet --disable-pip-version-check $want \
        || { _svc_err "pip could not install $want (is PyPI reachable?)"; return 1; }
    echo "$want" > "$venv/.pinned"
}
