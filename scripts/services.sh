#!/usr/bin/env bash
# Installs (from Debian packages) and starts what jarvis-deploy needs on this machine and is not
# running yet: the Docker Engine, and with --test also the loopback registry, Caddy, docker-compose
# and the test images. PostgreSQL and Redis are expected to run already.
set -euo pipefail

STATE_DIR=${JARVIS_STATE_DIR:-/var/tmp/jarvis-deploy}
REGISTRY_ADDR=${JARVIS_TEST_REGISTRY:-localhost:5000}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$STATE_DIR"

want_test=false
[[ "${1:-}" == "--test" ]] && want_test=true

apt_updated=false
install_packages() {
    local missing=()
    while (($#)); do
        command -v "$1" >/dev/null 2>&1 || missing+=("$2")
        shift 2
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing packages: ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
        exit 1
    fi
    if ! $apt_updated; then
        apt-get update -qq
        apt_updated=true
    fi
    echo "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

wait_for() {
    local what=$1 seconds=$2
    shift 2
    for _ in $(seq 1 "$((seconds * 4))"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    echo "$what did not come up within ${seconds}s" >&2
    return 1
}

install_packages dockerd docker.io
if ! timeout 10 docker info >/dev/null 2>&1; then
    echo "starting dockerd (log: $STATE_DIR/dockerd.log)"
    setsid dockerd --host unix:///var/run/docker.sock >"$STATE_DIR/dockerd.log" 2>&1 < /dev/null &
    wait_for "dockerd" 60 timeout 5 docker info
fi

$want_test || exit 0

install_packages docker-registry docker-registry busybox busybox-static caddy caddy docker-compose docker-compose

if ! curl -fsS "http://$REGISTRY_ADDR/v2/" >/dev/null 2>&1; then
    mkdir -p "$STATE_DIR/registry"
    cat >"$STATE_DIR/registry.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $STATE_DIR/registry
  delete:
    enabled: true
http:
  addr: ${REGISTRY_ADDR/localhost/127.0.0.1}
YAML
    echo "starting the registry on $REGISTRY_ADDR (log: $STATE_DIR/registry.log)"
    setsid docker-registry serve "$STATE_DIR/registry.yml" >"$STATE_DIR/registry.log" 2>&1 < /dev/null &
    wait_for "the registry" 30 curl -fsS "http://$REGISTRY_ADDR/v2/"
fi

JARVIS_TEST_REGISTRY=$REGISTRY_ADDR "$HERE/build-test-images.sh"
