#!/usr/bin/env bash
# Boots a real systemd (as PID 1 of its own pid/mount/uts/ipc/cgroup namespaces) for tests and drills, following
# the SAFETY rules below. Needs root, unshare, nsenter, script (util-linux) and /lib/systemd/systemd.
#
#   systemd-sandbox.sh up DIR [OWNER_PID]   boot; DIR/units holds the units under test (and npu-test.target,
#                                           the unit systemd starts). Prints the namespace's PID 1 (host pid)
#                                           once `systemctl is-system-running` says running or degraded.
#   systemd-sandbox.sh boot DIR [OWNER_PID] the same in two steps: `boot` runs in the foreground until the
#   systemd-sandbox.sh ready DIR              sandbox ends, `ready` waits for systemd and prints PID 1's pid
#   systemd-sandbox.sh run DIR CMD...       run CMD inside (systemctl, journalctl, kill ...)
#   systemd-sandbox.sh down DIR             `systemctl exit` inside, SIGKILL of its PID 1 as fallback, cgroup removed
#   systemd-sandbox.sh check                exit 0 if namespaces can be created here, else print why and exit 1
#
# Opt-in: a file DIR/with-memory-cgroup gives the sandbox a memory controller (pure v2 hosts: enabled for its
# cgroup folder; hybrid hosts: the v1 memory hierarchy mounted at /run/sandbox-memory inside, rooted at a memory
# cgroup made for the sandbox and removed with it), so that services can put children in memory cgroups and a
# real OOM kill can happen inside.
#
# SAFETY (a carelessly booted systemd starts the host's boot units, one of which empties the host's /tmp):
# - systemd sees only a whitelist of units: SYSTEMD_UNIT_PATH=DIR/units, which holds copies of journald, the
#   exit/shutdown plumbing, a few targets, stub sysinit.target and basic.target written here, and the units
#   under test. No generators (SYSTEMD_GENERATOR_PATH and SYSTEMD_ENVIRONMENT_GENERATOR_PATH point at an
#   empty folder).
# - Every mount inherited from the host is remounted read-only inside (the host root, /sys, /proc/sys, ...); only
#   what is created here is writable: tmpfs on /run, /tmp, /var/tmp, /var/log/journal, a private /dev, the
#   namespace's own cgroup2 folder, and DIR itself (bind-mounted read-write). Every mount uses `mount -n`.
# - `down` always removes everything (tests call it from a defer); `boot` also reaps sandboxes whose owner
#   process is gone (a test run that was killed), recognised by their cgroup folder's name `npu-sd-<owner>-*`.
set -euo pipefail

SELF=$(readlink -f "$0")
SYSTEMD=/lib/systemd/systemd
SYSUNITS=/lib/systemd/system
WHITELIST=(systemd-journald.service systemd-journald.socket systemd-journald-dev-log.socket
    shutdown.target umount.target final.target exit.target systemd-exit.service halt.target systemd-halt.service
    poweroff.target systemd-poweroff.service sockets.target timers.target paths.target slices.target)

die() { echo "systemd-sandbox: $*" >&2; exit 1; }

cgroup_base() {
    if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ]; then echo /sys/fs/cgroup
    elif [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]; then echo /sys/fs/cgroup/unified
    else return 1; fi
}

# Kills (by pid) what is left in a sandbox cgroup folder and removes the folder, deepest first.
remove_cgroup() {
    local cg=$1 deadline=$((SECONDS + 10)) pid
    [ -d "$cg" ] || return 0
    while [ -d "$cg" ] && [ $SECONDS -lt $deadline ]; do
        while read -r pid; do [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
        done < <(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null)
        find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [ -d "$cg" ] && sleep 0.05
    done
    [ ! -d "$cg" ] || echo "systemd-sandbox: could not remove $cg" >&2
}

# This process's folder in a v1 memory hierarchy (hybrid hosts), if there is one.
memory_v1_dir() {
    local mp path
    mp=$(findmnt -n -o TARGET -t cgroup -O memory 2>/dev/null | head -1)
    path=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3}' /proc/self/cgroup)
    [ -n "$mp" ] && [ -n "$path" ] && [ -d "$mp$path" ] && echo "$mp${path%/}"
}

reap_stale() {
    local base=$1 cg name owner
    for cg in "$base"/npu-sd-*; do
        [ -d "$cg" ] || continue
        name=${cg##*/}; owner=${name#npu-sd-}; owner=${owner%%-*}
        if ! kill -0 "$owner" 2>/dev/null; then
            echo "systemd-sandbox: removing stale sandbox $cg (owner $owner is gone)" >&2
            remove_cgroup "$cg"
        fi
    done
}

write_units() {
    local dir=$1 unit
    mkdir -p "$dir/units" "$dir/empty"
    for unit in "${WHITELIST[@]}"; do
        [ -e "$dir/units/$unit" ] || cp "$SYSUNITS/$unit" "$dir/units/$unit"
    done
    printf '[Unit]\nDescription=sysinit (sandbox stub)\n' >"$dir/units/sysinit.target"
    printf '[Unit]\nDescription=basic (sandbox stub)\n' >"$dir/units/basic.target"
    [ -e "$dir/units/npu-test.target" ] || printf '%s\n' '[Unit]' 'Description=sandbox target' \
        'Wants=systemd-journald.service' 'After=systemd-journald.service' >"$dir/units/npu-test.target"
}

cmd_check() {
    [ "$(id -u)" -eq 0 ] || die "needs root (running as uid $(id -u))"
    [ -x "$SYSTEMD" ] || die "$SYSTEMD is not installed (apt-get install systemd)"
    local tool
    for tool in unshare nsenter script mount; do
        command -v "$tool" >/dev/null || die "$tool is missing (apt-get install util-linux)"
    done
    cgroup_base >/dev/null || die "no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified"
    local out
    out=$(unshare --pid --fork --mount --uts --ipc --cgroup sh -c 'mount -n --make-rprivate / && echo ok' 2>&1) \
        || die "cannot create namespaces here: $out"
    [ "$out" = ok ] || die "cannot create namespaces here: $out"
}

# Foreground: ends when the sandbox ends (a test keeps this process as its child and reaps it after `down`).
cmd_boot() {
    local dir owner base cg
    dir=$(readlink -f "$1"); owner=${2:-$PPID}
    cmd_check
    base=$(cgroup_base)
    reap_stale "$base"
    write_units "$dir"
    cg="$base/npu-sd-$owner-$$"
    mkdir -p "$cg/payload" "$cg/launcher"
    rm -f "$dir/go" "$dir/init.pid" "$dir/unshare.pid" "$dir/memcg.path"
    echo "$cg" >"$dir/cgroup.path"
    # The opt-in v1 memory hierarchy (see _init) is rooted at a memory cgroup of the sandbox's own, removed with it.
    # On a pure v2 host the same request enables the memory controller for the sandbox's systemd.
    if [ -e "$dir/with-memory-cgroup" ] && grep -qw memory "$cg/cgroup.controllers" 2>/dev/null; then
        echo +memory >"$cg/cgroup.subtree_control" 2>/dev/null || true
    fi
    local memroot
    if [ -e "$dir/with-memory-cgroup" ] && memroot=$(memory_v1_dir); then
        reap_stale "$memroot"
        mkdir -p "$memroot/npu-sd-$owner-$$"
        echo "$memroot/npu-sd-$owner-$$" >"$dir/memcg.path"
    fi
    # PID 1 wants a tty as its console: `script` provides a pty.
    exec script -qfec "$SELF _launch $dir $cg" "$dir/console.log" </dev/null >/dev/null 2>&1
}

# Waits for the sandbox that `boot` started, lets PID 1 go on, waits for systemd to be up; prints PID 1's host pid.
cmd_ready() {
    local dir cg deadline=$((SECONDS + 20)) upid= init= state=
    dir=$(readlink -f "$1")
    fail() { echo "systemd-sandbox: $*; console:" >&2; tail -20 "$dir/console.log" >&2 2>/dev/null; exit 1; }
    while [ -z "$init" ]; do
        [ $SECONDS -lt $deadline ] || fail "the namespace did not come up"
        [ -s "$dir/unshare.pid" ] && upid=$(cat "$dir/unshare.pid")
        [ -n "$upid" ] && init=$(awk '{print $1}' "/proc/$upid/task/$upid/children" 2>/dev/null || true)
        [ -n "$init" ] || sleep 0.02
    done
    echo "$init" >"$dir/init.pid"
    cg=$(cat "$dir/cgroup.path")
    # unshare stays behind in the namespace's root cgroup; move it aside so that the root holds no process.
    echo "$upid" >"$cg/launcher/cgroup.procs"
    touch "$dir/go"
    while :; do
        state=$(nsenter -t "$init" -a systemctl is-system-running 2>/dev/null || true)
        case "$state" in running|degraded) break ;; esac
        [ $SECONDS -lt $deadline ] && kill -0 "$init" 2>/dev/null || fail "systemd did not reach running (last: '$state')"
        sleep 0.02
    done
    echo "$init"
}

# For people: boot in the background and wait (the detached `script` becomes a child of the host's PID 1).
cmd_up() {
    local dir
    dir=$(readlink -f "$1")
    mkdir -p "$dir"
    setsid "$SELF" boot "$dir" "${2:-$PPID}" </dev/null >/dev/null 2>&1 &
    cmd_ready "$dir" || { cmd_down "$dir"; exit 1; }
}

# Runs under `script` (a pty), in the sandbox's cgroup; becomes unshare, whose child is the namespace's PID 1.
cmd_launch() {
    local dir=$1 cg=$2
    echo $$ >"$cg/payload/cgroup.procs"
    [ -s "$dir/memcg.path" ] && echo $$ >"$(cat "$dir/memcg.path")/cgroup.procs"
    echo $$ >"$dir/unshare.pid"
    exec unshare --pid --fork --mount --uts --ipc --cgroup "$SELF" _init "$dir"
}

# PID 1 of the new namespaces until it execs systemd.
cmd_init() {
    local dir=$1 console mp opts
    console=$(tty)
    local deadline=$((SECONDS + 10))
    until [ -e "$dir/go" ]; do [ $SECONDS -lt $deadline ] || exit 1; sleep 0.01; done
    mount -n --make-rprivate /
    # Every inherited mount read-only (the host root first of all).
    while read -r _ _ _ _ mp opts _; do
        mp=$(printf '%b' "${mp//\\/\\0}")
        case ",$opts," in *,ro,*) continue ;; esac
        mount -n -o remount,bind,ro "$mp" 2>/dev/null || echo "systemd-sandbox: could not make $mp read-only" >&2
    done < <(tac /proc/self/mountinfo)
    # Refuse to go on unless the host root and /sys really are read-only now.
    for mp in / /sys; do
        case ",$(awk -v m="$mp" '$5 == m {o = $6} END {print o}' /proc/self/mountinfo)," in
            *,ro,*) ;;
            *) echo "systemd-sandbox: $mp is still writable; not booting" >&2; exit 1 ;;
        esac
    done
    mount -n -t proc -o nosuid,nodev,noexec proc /proc
    mount -n --bind /proc/sys /proc/sys && mount -n -o remount,bind,ro /proc/sys
    if [ -e /proc/sysrq-trigger ]; then
        mount -n --bind /proc/sysrq-trigger /proc/sysrq-trigger && mount -n -o remount,bind,ro /proc/sysrq-trigger
    fi
    # The host's cgroup mounts go (this mount namespace only); systemd gets a pure v2 view rooted at the sandbox's
    # own folder.
    umount -n -R -l /sys/fs/cgroup 2>/dev/null || true
    mount -n -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
    mount -n -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
    # Opt-in (DIR/with-memory-cgroup): on hosts whose memory controller is on a v1 hierarchy (hybrid), mount that
    # hierarchy too, rooted (cgroup namespace) at the sandbox's own memory cgroup, so that services can create
    # memory cgroups for their children and a real OOM kill can happen inside. Nothing outside the sandbox's
    # memory cgroup is reachable through it.
    if [ -s "$dir/memcg.path" ]; then
        mkdir -p /run/sandbox-memory
        mount -n -t cgroup -o memory,nosuid,nodev,noexec cgroup /run/sandbox-memory || true
    fi
    # Private /tmp and /var/tmp. The checkout (binaries, this script) and DIR may live below the host's: keep
    # them visible at the same paths, through a read-only bind held aside while the tmpfs goes on.
    local hold=/run/sandbox-host tree
    tree=$(dirname "$(dirname "$SELF")")
    mkdir -p "$hold/tmp" "$hold/var-tmp"
    mount -n --bind /tmp "$hold/tmp"
    [ -d /var/tmp ] && mount -n --bind /var/tmp "$hold/var-tmp"
    mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
    [ -d /var/tmp ] && mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
    for keep in "$tree" "$dir"; do
        case "$keep" in
            /tmp/*) mkdir -p "$keep" && mount -n --bind "$hold/tmp/${keep#/tmp/}" "$keep" ;;
            /var/tmp/*) mkdir -p "$keep" && mount -n --bind "$hold/var-tmp/${keep#/var/tmp/}" "$keep" ;;
        esac
    done
    umount -n "$hold/tmp" "$hold/var-tmp" 2>/dev/null || true
    rmdir "$hold/tmp" "$hold/var-tmp" "$hold" 2>/dev/null || true
    [ -d /var/log/journal ] && mount -n -t tmpfs -o mode=755,nosuid,nodev tmpfs /var/log/journal
    # A private /dev: a few host device nodes, the pty as console, a devpts instance of its own.
    local dev=/run/sandbox-dev node
    mkdir -p "$dev"
    mount -n -t tmpfs -o mode=755,nosuid tmpfs "$dev"
    for node in null zero full random urandom tty; do
        touch "$dev/$node"; mount -n --bind "/dev/$node" "$dev/$node"
    done
    touch "$dev/console"; mount -n --bind "$console" "$dev/console"
    mkdir -p "$dev/pts" "$dev/shm"
    mount -n -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$dev/pts"
    mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$dev/shm"
    ln -s pts/ptmx "$dev/ptmx"; ln -s /proc/self/fd "$dev/fd"
    ln -s /proc/self/fd/0 "$dev/stdin"; ln -s /proc/self/fd/1 "$dev/stdout"; ln -s /proc/self/fd/2 "$dev/stderr"
    mount -n --move "$dev" /dev
    # The scratch folder stays writable (sockets, configs, logs the host side reads).
    mount -n --bind "$dir" "$dir" && mount -n -o remount,bind,rw "$dir"
    exec </dev/console >/dev/console 2>&1
    exec env -i container=npu-sd-sandbox TERM=dumb PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        SYSTEMD_UNIT_PATH="$dir/units" SYSTEMD_GENERATOR_PATH="$dir/empty" \
        SYSTEMD_ENVIRONMENT_GENERATOR_PATH="$dir/empty" \
        "$SYSTEMD" --system --unit=npu-test.target --log-target=journal --show-status=no
}

cmd_run() {
    local dir=$1; shift
    nsenter -t "$(cat "$dir/init.pid")" -a "$@"
}

cmd_down() {
    local dir cg init deadline
    dir=$(readlink -f "$1")
    init=$(cat "$dir/init.pid" 2>/dev/null || true)
    cg=$(cat "$dir/cgroup.path" 2>/dev/null || true)
    if [ -n "$init" ] && kill -0 "$init" 2>/dev/null; then
        timeout 5 nsenter -t "$init" -a systemctl exit >/dev/null 2>&1 || true
        deadline=$((SECONDS + 5))
        while kill -0 "$init" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.02; done
        # PID 1 of a pid namespace takes every process of the namespace with it.
        kill -KILL "$init" 2>/dev/null || true
    fi
    [ -n "$cg" ] && remove_cgroup "$cg"
    [ -s "$dir/memcg.path" ] && remove_cgroup "$(cat "$dir/memcg.path")"
    rm -f "$dir/init.pid" "$dir/go" "$dir/memcg.path"
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    boot) shift; cmd_boot "$@" ;;
    ready) shift; cmd_ready "$@" ;;
    run) shift; cmd_run "$@" ;;
    down) shift; cmd_down "$@" ;;
    check) cmd_check ;;
    _launch) shift; cmd_launch "$@" ;;
    _init) shift; cmd_init "$@" ;;
    *) die "usage: $0 up DIR [OWNER_PID] | run DIR CMD... | down DIR | check" ;;
esac
