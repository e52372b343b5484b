#!/usr/bin/env bash
# Install the Debian packages that the tests need and a fresh machine lacks:
#   Ceph (monitor, OSD, radosgw) for a real S3 server on loopback (deploy/radosgw.sh),
#   Chromium for the explorer's browser test.
# Installs nothing when everything is already there; needs root (or sudo) otherwise.
set -euo pipefail

need=()
command -v radosgw >/dev/null 2>&1 || need+=(radosgw)
command -v ceph-mon >/dev/null 2>&1 || need+=(ceph-mon)
command -v ceph-osd >/dev/null 2>&1 || need+=(ceph-osd)
command -v radosgw-admin >/dev/null 2>&1 || need+=(ceph-common)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)

if [ ${#need[@]} -eq 0 ]; then
    echo "system packages: all present"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root to install: ${need[*]}" >&2; exit 1; }
    sudo="sudo"
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${need[@]}"
