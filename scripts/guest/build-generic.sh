#!/bin/bash
# The generic guest: Debian's generic kernel (linux-image-amd64, the lab's: it has
# CONFIG_VMGENID, which the cloud kernel lacks) as an ELF vmlinux booted through its PVH note (no
# decompression, which costs seconds under the lab's emulated CPU), and an initramfs like the
# default one (busybox-static, init.sh) with the generic kernel's virtio/vsock/ext4 modules.
#   build-generic.sh inputs | build DIR  (writes DIR/vmlinux and DIR/initramfs.cpio.gz)
source "$(dirname "$0")/lib.sh"
META=linux-image-amd64
MODULES="virtio virtio_ring virtio_mmio virtio_pci virtio_blk virtio_net net_failover failover
  vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport virtio_rng
  crc16 mbcache jbd2 crc32c_generic crc32c_intel ext4"
case "${1:-}" in
  inputs)
    apt_ready; p=$(kernel_pkg $META)
    echo "$p=$(pkg_version "$p")"; echo "busybox-static=$(pkg_version busybox-static)"
    echo "modules=$MODULES" ;;
  build)
    need_tools depmod:kmod cpio:cpio
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    kver=$(kernel_extract $META "$tmp/k")
    grep -q '^CONFIG_VMGENID=y' "$tmp/k/boot/config-$kver" || { log "$kver has no CONFIG_VMGENID=y"; exit 1; }
    vmlinux_from_bzimage "$tmp/k/boot/vmlinuz-$kver" "$2/vmlinux"
    echo "$kver" >"$2/kernel.release"
    stage_busybox "$tmp/s"
    # shellcheck disable=SC2086
    stage_modules "$tmp/k" "$kver" "$tmp/s" $MODULES
    install -m 755 "$(dirname "$0")/init.sh" "$tmp/s/init"
    make_cpio "$tmp/s" "$2/initramfs.cpio.gz"
    ;;
  *) echo "usage: $0 inputs | build DIR" >&2; exit 2 ;;
esac
