#!/bin/bash
# Debian root disk (ext4 image) for I/O benchmarks and tests: debootstrap minbase + fio, iperf3,
# iproute2, socat, curl (the MMDS test), and our init.sh as /init. Built without loop mounts (mkfs.ext4 -d).
#   build-rootfs.sh inputs | build DIR  (writes DIR/rootfs.ext4)
source "$(dirname "$0")/lib.sh"
SUITE=bookworm
PKGS="fio iperf3 iproute2 socat busybox-static curl"
# The mirror this machine's apt already uses (CI machines may point elsewhere).
mirror() {
  apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' |
    awk -v s=$SUITE '$2 == s { print $1; exit }'
}
case "${1:-}" in
  inputs)
    apt_ready
    echo "suite=$SUITE mirror=$(mirror)"
    for p in $PKGS; do echo "$p=$(pkg_version "$p")"; done ;;
  build)
    need_tools debootstrap:debootstrap mkfs.ext4:e2fsprogs
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    root="$tmp/root"
    DEBIAN_FRONTEND=noninteractive debootstrap --variant=minbase \
      --include="${PKGS// /,}" $SUITE "$root" "$(mirror)" >&2
    install -m 755 "$(dirname "$0")/init.sh" "$root/init"
    touch "$root/etc/typervisor-rootfs" # tells init.sh it is already on the final root
    echo typervisor >"$root/etc/hostname"
    # minbase has no init system, so no poweroff/reboot: busybox's work without one.
    for a in poweroff reboot halt; do
      [[ -e "$root/sbin/$a" ]] || ln -s /bin/busybox "$root/sbin/$a"
    done
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    # Size: contents plus room for fio's test files.
    mb=$(($(du -sm "$root" | cut -f1) + 768))
    mkfs.ext4 -q -F -L rootfs -d "$root" "$2/rootfs.ext4" "${mb}M" >&2
    ;;
  *) echo "usage: $0 inputs | build DIR" >&2; exit 2 ;;
esac
