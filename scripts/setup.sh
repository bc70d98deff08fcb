#!/bin/bash
# Installs every Debian package the project needs (development, tests, the lab, guest image
# recipes). Idempotent and quick when all are present: it asks dpkg first, apt only if needed.
set -euo pipefail
PKGS=(qemu-system-x86 qemu-utils busybox-static debootstrap cpio e2fsprogs kmod xz-utils
  acpica-tools gcc g++ make python3 iproute2 socat curl util-linux iperf3)

installed=" $(dpkg-query -W -f='${Package}:${db:Status-Status} ' "${PKGS[@]}" 2>/dev/null || true) "
missing=()
for p in "${PKGS[@]}"; do
  [[ "$installed" == *" $p:installed "* ]] || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "setup: all ${#PKGS[@]} packages installed"
  exit 0
fi
SUDO=; ((EUID == 0)) || SUDO=sudo
# A fresh machine may have no package lists yet.
ls /var/lib/apt/lists/*Packages* >/dev/null 2>&1 || $SUDO apt-get update -qq
echo "setup: installing ${missing[*]}"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
  { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; }
