#!/usr/bin/env bash
# Install the Debian packages tokenbridge's tests and demo need, if any are missing, and make
# sure pcscd runs. Used by `make test`, `make demo` and `.ci/run`. Idempotent.
set -euo pipefail

PKGS=(ca-certificates pcscd vsmartcard-vpcd opensc opensc-pkcs11 osslsigncode libengine-pkcs11-openssl
      libusb-1.0-0 openssl python3-venv procps iproute2 systemd
      umockdev gir1.2-umockdev-1.0 libumockdev0 python3-gi usbip)  # systemd: systemd-analyze for tests/systemd; umockdev..python3-gi: the USB rig (tests/support/usb_rig); usbip: `usbip list` against the client's USB/IP reader

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

SUDO=()
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then SUDO=(); elif command -v sudo >/dev/null; then SUDO=(sudo); else
        echo "tokenbridge: missing Debian packages: ${missing[*]}" >&2
        echo "tokenbridge: install them as root: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "tokenbridge: installing Debian packages: ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# pcscd reads /etc/reader.conf.d only at start: a pcscd that was running before vpcd was just
# installed would not show the "Virtual PCD" readers, so restart it in that one case.
if [[ " ${missing[*]} " == *" vsmartcard-vpcd "* ]] && pgrep -x pcscd >/dev/null; then
    echo "tokenbridge: restarting pcscd so it loads the newly installed vpcd driver"
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
        ${SUDO[@]+"${SUDO[@]}"} systemctl restart pcscd.service || true
    else
        ${SUDO[@]+"${SUDO[@]}"} pkill -x pcscd || true
        for _ in $(seq 50); do pgrep -x pcscd >/dev/null || break; sleep 0.1; done
    fi
fi

# pcscd is one per machine (socket under /run/pcscd); start it only if nobody runs it yet.
if ! pgrep -x pcscd >/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
        "${SUDO[@]}" systemctl start pcscd.socket pcscd.service || "${SUDO[@]}" pcscd
    else
        "${SUDO[@]}" pcscd
    fi
    for _ in $(seq 50); do [[ -S /run/pcscd/pcscd.comm ]] && break; sleep 0.1; done
    echo "tokenbridge: started pcscd"
fi
[[ -S /run/pcscd/pcscd.comm ]] || { echo "tokenbridge: pcscd is not answering on /run/pcscd/pcscd.comm" >&2; exit 1; }
