#!/bin/bash
# The lab: Debian's generic kernel (it has 9p and virtio-pci; the cloud kernel has no 9p) and a
# small initramfs that mounts the host's / over 9p and runs a command there (lab-init.sh).
#   build-lab.sh inputs | build DIR  (writes DIR/vmlinux and DIR/initramfs.cpio.gz)
source "$(dirname "$0")/lib.sh"
META=linux-image-amd64
MODULES="virtio_pci virtio_console 9pnet_virtio 9p kvm kvm_amd tun bridge vhost vhost_net
  vhost_vsock vsock vmw_vsock_virtio_transport_common"
case "${1:-}" in
  inputs)
    apt_ready; p=$(kernel_pkg $META)
    echo "$p=$(pkg_version "$p")"; echo "busybox-static=$(pkg_version busybox-static)"
    echo "modules=$MODULES" ;;
  build)
    need_tools depmod:kmod cpio:cpio gcc:gcc
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    kver=$(kernel_extract $META "$tmp/k")
    # The lab boots the uncompressed ELF (PVH entry): decompressing the bzImage under TCG
    # costs several seconds of every lab start.
    vmlinux_from_bzimage "$tmp/k/boot/vmlinuz-$kver" "$2/vmlinux"
    stage_busybox "$tmp/s"
    # shellcheck disable=SC2086
    stage_modules "$tmp/k" "$kver" "$tmp/s" $MODULES
    install -m 755 "$(dirname "$0")/lab-init.sh" "$tmp/s/init"
    # Holds one VM open for the lab's life (see the file: no live kernel-text rewrites).
    gcc -static -Os -Wall -Werror -o "$tmp/s/bin/lab-kvm-hold" "$(dirname "$0")/lab-kvm-hold.c"
    make_cpio "$tmp/s" "$2/initramfs.cpio.gz"
    ;;
  *) echo "usage: $0 inputs | build DIR" >&2; exit 2 ;;
esac
