#!/usr/bin/env bash
# Build the test application images from the host's static busybox, without pulling any base
# image, and push them to the test registry:
#
#   <registry>/jarvis-testapp:v1           busybox httpd on $PORT, version "v1"
#   <registry>/jarvis-testapp:v2           the same with version "v2"
#   <registry>/jarvis-testapp:healthcheck  v1 with a Docker HEALTHCHECK on /cgi-bin/health
#   <registry>/jarvis-testapp:pull         version "pull"; an image id of its own, which a test may
#                                          remove locally without touching the other tags
#
# Environment variables of a running test container:
#   PORT=8080       port that httpd listens on
#   START_DELAY=N   seconds to wait before httpd starts listening
#   HEALTH_FAIL=1   /cgi-bin/health responds 500
#   FAIL_AFTER=N    /cgi-bin/health responds 500 once N seconds have passed since start
#   CRASH_AFTER=N   the process exits N seconds after start with exit code CRASH_CODE (default 3)
#   START_COUNTER_DIR=DIR, FAIL_FROM_START=N
#                   each start adds a file to DIR, a volume that the replicas share. A container
#                   whose start is number N or later in that directory fails /cgi-bin/health.
# Paths: /cgi-bin/version prints the version, /cgi-bin/env?NAME prints the value of NAME without
# an added newline (404 when NAME is not set), /cgi-bin/health prints "ok".
#
# Each image carries a label with a hash of this script and of busybox. The script skips an image
# whose tag in the registry already has that hash, so a second run takes about a second.
# It expects dockerd and the registry to run already.
#
# Usage: scripts/build-test-images.sh   (registry from JARVIS_TEST_REGISTRY, default localhost:5000)
set -euo pipefail

registry="${JARVIS_TEST_REGISTRY:-localhost:5000}"
repository="jarvis-testapp"
busybox="${BUSYBOX:-/usr/bin/busybox}"
hash_label="dev.jarvis-deploy.test-image-hash"
applets=(sh ash httpd sleep echo cat env date kill wget awk printf ls ps test "[" true false
    mkdir rm nc id grep sed head tail hostname wc touch)

if [[ ! -x "$busybox" ]]; then
    echo "busybox not found at $busybox; install busybox-static (the images contain no libc) or set BUSYBOX" >&2
    exit 1
fi

source_hash="$( { cat -- "$0"; cat -- "$busybox"; } | sha256sum | cut -d' ' -f1)"

# Succeed when the registry's manifest of <tag> has a config blob with the current source hash.
registry_has_current() {
    local tag="$1" manifest config_digest
    manifest="$(curl -fsS \
        -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
        "http://$registry/v2/$repository/manifests/$tag" 2>/dev/null)" || return 1
    # In an image manifest of schema 2, the config descriptor comes before the layers.
    config_digest="$(printf '%s' "$manifest" | grep -o '"digest": *"sha256:[0-9a-f]*"' | head -n1 \
        | grep -o 'sha256:[0-9a-f]*')" || return 1
    curl -fsS "http://$registry/v2/$repository/blobs/$config_digest" 2>/dev/null \
        | grep -q "\"$hash_label\":\"$source_hash\""
}

local_has_current() {
    local image="$1" label
    label="$(docker image inspect --format "{{ index .Config.Labels \"$hash_label\" }}" "$image" 2>/dev/null)" \
        || return 1
    [[ "$label" == "$source_hash" ]]
}

# Write the root file system of one version into the directory $1.
write_rootfs() {
    local root="$1" version="$2" applet

    mkdir -p "$root/bin" "$root/etc" "$root/www/cgi-bin" "$root/tmp"
    chmod 1777 "$root/tmp"
    cp -- "$busybox" "$root/bin/busybox"
    for applet in "${applets[@]}"; do
        ln -s busybox "$root/bin/$applet"
    done
    printf '%s\n' "$version" >"$root/etc/testapp-version"
    printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnobody:x:65534:\n' >"$root/etc/group"
    printf '<!doctype html><title>testapp %s</title><p>testapp %s</p>\n' "$version" "$version" \
        >"$root/www/index.html"

    cat >"$root/bin/start" <<'EOF'
#!/bin/sh
PORT="${PORT:-8080}"
VERSION="$(cat /etc/testapp-version)"
# Seconds since boot with centiseconds; `date +%s` would make FAIL_AFTER up to a second early.
read -r uptime _ </proc/uptime
echo "$uptime" >/tmp/started
httpd_pid=""
if [ -n "${START_COUNTER_DIR:-}" ]; then
    mkdir -p "$START_COUNTER_DIR"
    start_number=$(( $(ls "$START_COUNTER_DIR" | wc -l) + 1 ))
    touch "$START_COUNTER_DIR/start-$start_number-$(hostname)"
    echo "$start_number" >/tmp/start-number
fi

stop() {
    if [ -n "$httpd_pid" ]; then
        kill "$httpd_pid" 2>/dev/null
    fi
    echo "testapp $VERSION stopping"
    exit 0
}
# The shell runs as PID 1, which ignores SIGTERM unless it installs a handler. A trap runs only
# between commands, so every sleep below runs in the background under `wait`.
trap stop TERM INT

if [ -n "${START_DELAY:-}" ]; then
    echo "testapp $VERSION waiting ${START_DELAY}s before listening"
    sleep "$START_DELAY" &
    wait $!
fi

httpd -f -p "$PORT" -h /www &
httpd_pid=$!
echo "testapp $VERSION listening on $PORT"
echo "testapp $VERSION started with pid $httpd_pid" >&2

if [ -n "${CRASH_AFTER:-}" ]; then
    sleep "$CRASH_AFTER" &
    wait $!
    echo "testapp $VERSION crashing with exit code ${CRASH_CODE:-3}" >&2
    kill "$httpd_pid" 2>/dev/null
    exit "${CRASH_CODE:-3}"
fi
wait "$httpd_pid"
echo "testapp $VERSION: httpd exited" >&2
exit 1
EOF

    cat >"$root/www/cgi-bin/health" <<'EOF'
#!/bin/sh
read -r now _ </proc/uptime
started="$(cat /tmp/started)"
failing=0
if [ "${HEALTH_FAIL:-}" = 1 ]; then
    failing=1
elif [ -n "${FAIL_FROM_START:-}" ] && [ "$(cat /tmp/start-number 2>/dev/null || echo 0)" -ge "$FAIL_FROM_START" ]; then
    failing=1
elif [ -n "${FAIL_AFTER:-}" ] \
    && awk -v now="$now" -v started="$started" -v limit="$FAIL_AFTER" 'BEGIN { exit !(now - started >= limit) }'; then
    failing=1
fi
if [ "$failing" = 1 ]; then
    printf 'Status: 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\nfailing\n'
else
    printf 'Content-Type: text/plain\r\n\r\nok\n'
fi
EOF

    cat >"$root/www/cgi-bin/version" <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
cat /etc/testapp-version
EOF

    # awk reads the name and the value from ENVIRON, so neither goes through shell expansion or
    # awk's escape processing, and printf "%s" adds no newline.
    cat >"$root/www/cgi-bin/env" <<'EOF'
#!/bin/sh
if awk 'BEGIN { exit !(ENVIRON["QUERY_STRING"] in ENVIRON) }'; then
    printf 'Content-Type: application/octet-stream\r\n\r\n'
    awk 'BEGIN { printf "%s", ENVIRON[ENVIRON["QUERY_STRING"]] }'
else
    printf 'Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnot set\n'
fi
EOF

    chmod 0755 "$root/bin/start" "$root/www/cgi-bin/health" "$root/www/cgi-bin/version" "$root/www/cgi-bin/env"
}

# Build and push one tag; extra arguments are further `docker import --change` instructions.
build_image() {
    local tag="$1" version="$2"
    shift 2
    local image="$registry/$repository:$tag"
    local changes=(-c 'CMD ["/bin/start"]' -c 'EXPOSE 8080' -c "LABEL $hash_label=$source_hash")
    local change

    if registry_has_current "$tag"; then
        echo "$image is up to date in the registry"
        return
    fi

    if ! local_has_current "$image"; then
        for change in "$@"; do
            changes+=(-c "$change")
        done
        local workdir
        workdir="$(mktemp -d)"
        write_rootfs "$workdir/rootfs" "$version"
        tar -C "$workdir/rootfs" --owner=0 --group=0 --numeric-owner -cf - . \
            | docker import "${changes[@]}" - "$image" >/dev/null
        rm -rf -- "$workdir"
        echo "built $image"
    fi

    docker push "$image" >/dev/null
    echo "pushed $image"
}

build_image v1 v1
build_image v2 v2
build_image pull pull
build_image healthcheck v1 \
    'HEALTHCHECK --interval=1s --timeout=2s --retries=3 CMD ["/bin/sh", "-c", "wget -q -O /dev/null http://127.0.0.1:${PORT:-8080}/cgi-bin/health"]'

# Earlier builds lose their tags to the new ones; remove them unless a container still uses them.
docker image ls --quiet --filter dangling=true --filter "label=$hash_label" \
    | xargs --no-run-if-empty docker image rm >/dev/null 2>&1 || true
