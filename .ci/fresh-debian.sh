#!/usr/bin/env bash
# The install truth (DESIGN §9a): a freshly bootstrapped Debian 12 root runs exactly the README's
# commands, `apt-get install make python3`, `make demo`, `make test`, and nothing else first.
#
# What the root gets from this machine, and why:
# - Debian 12 itself, bootstrapped here by mmdebstrap from Debian's own mirror (minbase: what a
#   new machine has before anyone installs anything);
# - the tokenbridge tree as git sees it (tracked and untracked-but-not-ignored files: no .venv,
#   no caches), copied to /root/tokenbridge;
# - the pip configuration files and the local CA certificates, because that is how any new
#   machine on this network reaches the package registries; nothing else of the host's (no
#   Python, no venv, no packages, no environment variables).
# The root runs in its own PID, mount, UTS, IPC and network namespaces with its own /proc, /sys,
# /run, /tmp and /dev/shm, so its pcscd, its vpcd ports and its loopback are its own and cannot
# meet the host's (slirp4netns gives it a NAT'ed route out to the registries, nothing more).
#
# Usage: .ci/fresh-debian.sh [--keep]   (as root; --keep leaves the root in place for a look)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
keep=0
[[ ${1:-} == --keep ]] && keep=1
[[ $(id -u) -eq 0 ]] || { echo "fresh-debian: needs root (mmdebstrap, namespaces, mounts)" >&2; exit 1; }

say() { printf '[fresh-debian %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v slirp4netns >/dev/null || need+=(slirp4netns)
command -v unshare >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
    say "installing on the host: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

work=$(mktemp -d /var/tmp/tokenbridge-fresh.XXXXXX)
root=$work/root
slirp_pid=""
inner_pid=""
cleanup() {
    local rc=$?
    [[ -n $inner_pid ]] && kill "$inner_pid" 2>/dev/null || true
    [[ -n $slirp_pid ]] && kill "$slirp_pid" 2>/dev/null || true
    # Mounts live in the inner mount namespace and vanish with it; nothing to unmount here.
    if ((keep)); then say "root kept in $root"; else rm -rf --one-file-system "$work"; fi
    exit "$rc"
}
trap cleanup EXIT

t0=$SECONDS
say "bootstrapping Debian 12 (bookworm, minbase) into $root"
mmdebstrap --quiet --variant=minbase --mode=root bookworm "$root" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main"
say "bootstrapped in $((SECONDS - t0)) s"

# How this network's machines reach the registries: pip configuration and local CAs, no more.
for f in /etc/pip.conf /etc/xdg/pip/pip.conf /etc/xdg/pip/constraints.txt /root/.config/pip/pip.conf \
         /usr/local/share/ca-certificates/*; do
    [[ -f $f ]] || continue
    mkdir -p "$root$(dirname "$f")"
    cp -p "$f" "$root$f"
done
cp -L /etc/resolv.conf "$root/etc/resolv.conf"

mkdir -p "$root/root/tokenbridge"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -xf - -C "$root/root/tokenbridge"

# What the user types, and only that (README "Try it: two commands").
cat >"$root/root/readme-commands.sh" <<'EOF'
set -euo pipefail
cd /root/tokenbridge
export DEBIAN_FRONTEND=noninteractive
echo "== apt-get install make python3"
apt-get update -qq
apt-get install -y -qq make python3 >/dev/null
echo "== make demo"
make demo
echo "== make test"
make test
EOF

# Inside the new namespaces: wait for the network, mount what a machine has, enter the root.
cat >"$work/enter.sh" <<'EOF'
set -euo pipefail
root=$1
for _ in $(seq 200); do ip -4 addr show tap0 2>/dev/null | grep -q inet && break; sleep 0.05; done
ip -4 addr show tap0 | grep -q inet || { echo "fresh-debian: no network in the namespace" >&2; exit 1; }
ip link set lo up
mount --make-rprivate /
# A machine's / is a mount point; a bare chroot folder is not, and `ip -n`/`ip netns exec`
# (which make / a slave mount) fail there with "mount --make-rslave /: Invalid argument".
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
hostname fresh-debian12
exec chroot "$root" /usr/bin/env -i HOME=/root CI=true LANG=C.UTF-8 TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash /root/readme-commands.sh
EOF

say "running the README's commands in the fresh root"
t1=$SECONDS
unshare --pid --fork --mount --uts --ipc --net --kill-child bash "$work/enter.sh" "$root" </dev/null &
inner_pid=$!
# slirp4netns attaches to the namespace of the unshare process (its child is PID 1 in there).
# Wait until it has left this network namespace, or slirp4netns would attach to the host's.
host_ns=$(readlink /proc/self/ns/net)
for _ in $(seq 200); do
    ns=$(readlink "/proc/$inner_pid/ns/net" 2>/dev/null) || break
    [[ $ns != "$host_ns" ]] && break
    sleep 0.05
done
slirp4netns --configure --mtu=65520 --disable-host-loopback "$inner_pid" tap0 >"$work/slirp.log" 2>&1 &
slirp_pid=$!
rc=0
wait "$inner_pid" || rc=$?
inner_pid=""
say "README commands finished with exit code $rc after $((SECONDS - t1)) s (whole check $((SECONDS - t0)) s)"
exit "$rc"
