# shellcheck shell=bash
# The Python tools the test suite runs (sourced by deploy/test):
#   ensure_python_tools   pinned, in a virtual environment at target/tools/venv:
#                         - schemathesis and openapi-spec-validator (tests/tests/openapi.rs runs
#                           them against the orchestrator's OpenAPI document);
#                         - kubernetes-validate (the Kubernetes API's schemas of many versions)
#                           and pykustomize (kustomize's Go library, built into its wheel, with
#                           Python bindings): tests/tests/manifests.rs renders deploy/k8s's
#                           overlays with it and validates every object;
#                         PyYAML comes with kubernetes-validate (the compose file's test reads
#                         YAML with it). Installs Debian's python3 and python3-venv first when
#                         they are missing.
#
# Requires the helpers of deploy/lib/services.sh (log, _svc_err, _svc_apt_install).

SCHEMATHESIS_VERSION=4.32.5
OPENAPI_SPEC_VALIDATOR_VERSION=0.9.0
KUBERNETES_VALIDATE_VERSION=1.37.0
# Its wheel (py3-none-any) carries kustomize v5 (sigs.k8s.io/kustomize/api v0.21.3) as a shared
# library for linux-amd64, loaded through cffi. It declares Requires-Python >= 3.14 but uses
# nothing newer than 3.10 (Debian 12 has 3.11; the suite renders with it there), so it is
# installed with --ignore-requires-python, alone.
PYKUSTOMIZE_VERSION=0.1.4

ensure_python_tools() {
    local venv=${E2E_TOOLS_VENV:-target/tools/venv}
    local want="schemathesis==$SCHEMATHESIS_VERSION openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    local kustomize="pykustomize==$PYKUSTOMIZE_VERSION"
    if [[ -x "$venv/bin/schemathesis" && -x "$venv/bin/openapi-spec-validator" ]] \
        && [[ -x "$venv/bin/kubernetes-validate" ]] \
        && [[ "$(cat "$venv/.pinned" 2>/dev/null)" == "$want $kustomize" ]]; then
        log "schemathesis, openapi-spec-validator, kubernetes-validate and pykustomize are installed ($venv)"
        return 0
    fi
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        log "python3 with venv is missing"
        _svc_apt_install python3 python3-venv || return 1
    fi
    log "Installing $want $kustomize into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || { _svc_err "cannot create a virtual environment at $venv"; return 1; }
    # shellcheck disable=SC2086 # pinned requirements
    "$venv/bin/pip" install --quiet --disable-pip-version-check $want \
        || { _svc_err "pip could not install $want (is PyPI reachable?)"; return 1; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check --ignore-requires-python "$kustomize" \
        || { _svc_err "pip could not install $kustomize (is PyPI reachable?)"; return 1; }
    echo "$want $kustomize" > "$venv/.pinned"
}
