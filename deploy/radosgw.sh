#!/usr/bin/env bash
# A throwaway S3 server for tests, CI and local use: a real Ceph cluster on loopback
# (one ceph-mon, one memstore ceph-osd, radosgw with the beast frontend), no cephx.
#
#   deploy/radosgw.sh start [DIR]   start it (or, if already running, just print its env)
#   deploy/radosgw.sh env   [DIR]   print `export AWS_...` lines for the running server
#   deploy/radosgw.sh stop  [DIR]   kill the daemons and remove DIR
#
#   eval "$(deploy/radosgw.sh start)"
#
# DIR defaults to /tmp/vitscope-rgw. Overrides: RGW_PORT (7480), RGW_MON_PORT (a free port),
# RGW_ACCESS_KEY, RGW_SECRET_KEY, RGW_MEMSTORE_BYTES (2 GiB), RGW_START_TIMEOUT (90 s).
# Needs: apt-get install radosgw ceph-mon ceph-osd ceph-common. Data lives in RAM only.
set -euo pipefail

cmd=${1:-}
DIR=${2:-/tmp/vitscope-rgw}
RGW_PORT=${RGW_PORT:-7480}
ACCESS_KEY=${RGW_ACCESS_KEY:-VITSCOPETESTKEY}
SECRET_KEY=${RGW_SECRET_KEY:-vitscope-test-secret}
MEMSTORE_BYTES=${RGW_MEMSTORE_BYTES:-2147483648}
TIMEOUT=${RGW_START_TIMEOUT:-90}

die() {
    echo "radosgw.sh: $*" >&2
    if [[ -d "$DIR/log" ]]; then
        for f in "$DIR"/log/*; do
            [[ -s "$f" ]] || continue
            echo "----- tail of $f -----" >&2
            tail -n 15 "$f" >&2
        done
    fi
    kill_daemons  # a half-started cluster would hold the ports; DIR stays for a post-mortem
    exit 1
}

running() {  # running PID: a live process, not a zombie that init has yet to reap
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ ${stat##*) } != Z* ]]
}

alive() {  # alive NAME: the daemon's pid file names a running process
    local pidfile="$DIR/run/$1.pid"
    [[ -s "$pidfile" ]] && running "$(cat "$pidfile")"
}

print_env() {
    [[ -f "$DIR/env" ]] || die "no server state in $DIR (run: $0 start $DIR)"
    cat "$DIR/env"
}

endpoint_up() {
    # Any HTTP answer (radosgw says 200 with an empty bucket list for anonymous) means it serves.
    local url="http://127.0.0.1:$RGW_PORT/"
    if command -v curl >/dev/null; then
        curl -s -o /dev/null -m 2 "$url"
    else
        python3 -c "import sys,urllib.request as u
try: u.urlopen(sys.argv[1], timeout=2)
except u.HTTPError: pass" "$url" 2>/dev/null
    fi
}

quiet() { "$@" >/dev/null 2>&1; }

rgw_up() {
    alive client.rgw || die "radosgw exited"
    quiet endpoint_up
}

wait_for() {  # wait_for WHAT COMMAND...: poll until COMMAND succeeds or the deadline passes
    local what=$1; shift
    while ! "$@"; do
        (( SECONDS < deadline )) || die "timed out after ${TIMEOUT}s waiting for $what"
        sleep 0.3
    done
}

kill_daemons() {
    # SIGKILL: there is nothing to save (memstore keeps data in RAM and stop removes DIR), and
    # a graceful shutdown takes 2-5 s (the OSD waits for the monitor to mark it down).
    local name pids=()
    for name in client.rgw osd.0 mon.a; do
        alive "$name" && pids+=("$(cat "$DIR/run/$name.pid")")
    done
    (( ${#pids[@]} )) || return 0
    kill -9 "${pids[@]}" 2>/dev/null || true
    local pid gone
    for _ in $(seq 50); do  # wait until they are gone, so that their ports are free again
        gone=1
        for pid in "${pids[@]}"; do running "$pid" && gone=0; done
        (( gone )) && return 0
        sleep 0.1
    done
    echo "radosgw.sh: daemons ${pids[*]} did not exit" >&2
}

stop() {
    kill_daemons
    # Guard against `stop ~` and the like: only remove a folder this script made (or an empty one).
    if [[ -d "$DIR" && ! -f "$DIR/.radosgw-sh" && -n "$(ls -A "$DIR")" ]]; then
        echo "radosgw.sh: $DIR does not look like a radosgw.sh folder; not removing it" >&2
        exit 1
    fi
    rm -rf "$DIR"
}

start() {
    if alive mon.a && alive osd.0 && alive client.rgw && [[ -f "$DIR/env" ]]; then
        print_env
        return
    fi
    local bin
    for bin in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool ceph-authtool; do
        command -v "$bin" >/dev/null || {
            echo "radosgw.sh: $bin not found; run: apt-get install radosgw ceph-mon ceph-osd ceph-common" >&2
            exit 1
        }
    done
    [[ -e "$DIR" ]] && stop  # half-started or stale state: start from scratch
    if quiet endpoint_up; then
        echo "radosgw.sh: something already answers on 127.0.0.1:$RGW_PORT (set RGW_PORT)" >&2
        exit 1
    fi
    mkdir -p "$DIR"
    touch "$DIR/.radosgw-sh"  # lets stop tell this folder from one it must not delete
    mkdir -p "$DIR"/{mon,osd,rgw,run,log}
    DIR=$(cd "$DIR" && pwd)
    deadline=$((SECONDS + TIMEOUT))
    local mon_port=${RGW_MON_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
    local fsid; fsid=$(uuidgen)
    local conf="$DIR/ceph.conf"
    # The pool settings keep radosgw's ~8 auto-created pools under the per-OSD PG limit of a
    # one-OSD cluster; without them pool creation fails and radosgw never comes up.
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$mon_port]
mon initial members = a
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
keyring = $DIR/keyring
crash dir = $DIR/log
log to stderr = false
err to stderr = true

[mon]
mon data = $DIR/mon
# Each pool radosgw creates waits for a new OSD map; the default 1 s batching of monitor
# proposals made start-up take ~10 s longer.
paxos propose interval = 0.05
paxos min wait = 0.01
mon data avail warn = 1
mon data avail crit = 0

[osd]
osd data = $DIR/osd
osd objectstore = memstore
memstore device bytes = $MEMSTORE_BYTES
osd max object name len = 256
osd max object namespace len = 64

[client.rgw]
rgw data = $DIR/rgw
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw enable usage log = false
# radosgw defaults to a "secure" monitor connection, which needs cephx: without this it
# retries authentication forever (get_initial_auth_request returned -13).
ms mon client mode = crc
EOF
    export CEPH_CONF=$conf

    ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$DIR/monmap" >/dev/null
    ceph-mon --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring" \
        || die "ceph-mon --mkfs failed"
    ceph-mon -i a </dev/null >>"$DIR/log/daemons.out" 2>&1 || die "ceph-mon failed to start"
    wait_for "the monitor" quiet ceph --connect-timeout 5 mon stat

    local osd_uuid; osd_uuid=$(uuidgen)
    ceph --connect-timeout 10 osd new "$osd_uuid" >/dev/null || die "ceph osd new failed"
    ceph-osd --mkfs -i 0 --osd-uuid "$osd_uuid" >"$DIR/log/osd-mkfs.log" 2>&1 \
        || die "ceph-osd --mkfs failed"
    ceph-osd -i 0 </dev/null >>"$DIR/log/daemons.out" 2>&1 || die "ceph-osd failed to start"
    wait_for "the OSD to come up" quiet bash -c 'ceph --connect-timeout 5 osd dump | grep -q "^osd.0 up"'

    # radosgw-admin creates the zone's pools and the user before radosgw starts, so the first
    # request already has a user to authenticate against.
    timeout $(( deadline > SECONDS ? deadline - SECONDS : 1 )) \
        radosgw-admin -n client.rgw user create --uid vitscope --display-name vitscope \
        --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" >"$DIR/log/user-create.log" 2>&1 \
        || die "radosgw-admin user create failed or timed out"
    # radosgw only daemonizes once it has reached the cluster, so run it in the foreground in
    # the background: the deadline then covers its start-up too.
    radosgw -n client.rgw -f </dev/null >>"$DIR/log/daemons.out" 2>&1 &
    echo $! >"$DIR/run/client.rgw.pid"
    disown
    wait_for "the S3 endpoint on 127.0.0.1:$RGW_PORT" rgw_up

    cat >"$DIR/env" <<EOF
export AWS_ENDPOINT_URL=http://127.0.0.1:$RGW_PORT
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_DEFAULT_REGION=us-east-1
EOF
    print_env
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    env) print_env ;;
    *) echo "usage: $0 start|stop|env [DIR]" >&2; exit 2 ;;
esac
