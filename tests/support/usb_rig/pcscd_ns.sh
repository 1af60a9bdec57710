#!/bin/bash
# The reference host for the USB rig: a private pcscd with Debian's libccid, reaching the
# emulated token through umockdev, and a command run against it.
#
#   unshare --mount --propagation unchanged bash pcscd_ns.sh UMOCKDEV_DIR WORKDIR CMD [ARGS...]
#
# Inside its own mount namespace it makes the mount that holds /run/pcscd private (unshare's
# own --propagation private remounts "/", which fails in a chroot where "/" is no mount point)
# and puts a tmpfs on /run/pcscd, so this pcscd has its own socket and the machine's shared
# pcscd is untouched; an empty reader.conf.d keeps vpcd out.
# pcscd runs under umockdev-wrapper (libudev hotplug and libccid's libusb see the testbed) with
# debug logs in WORKDIR/pcscd.log; it is stopped by its PID when CMD ends.
set -euo pipefail
umockdev_dir=$1 work=$2
shift 2
mkdir -p /run/pcscd "$work/reader.conf.d"
holder=$(findmnt --noheadings --output TARGET --target /run/pcscd)
# Never mount over the shared /run/pcscd unless nothing can propagate back out.
mount --make-rprivate "$holder"
mount -t tmpfs -o mode=0755 tmpfs /run/pcscd
LIBCCID_ifdLogLevel=0x0007 UMOCKDEV_DIR=$umockdev_dir umockdev-wrapper pcscd --foreground --debug --config "$work/reader.conf.d" \
    >"$work/pcscd.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do [[ -S /run/pcscd/pcscd.comm ]] && break; sleep 0.1; done
# The reader is added by the hotplug thread once libccid has opened the device.
for _ in $(seq 100); do grep -q "Card ATR" "$work/pcscd.log" && break; sleep 0.1; done
"$@"
