#!/bin/bash
# Guest initramfs: busybox-static + the cloud kernel's virtio/vsock/ext4/balloon/pmem/mem modules + init.sh.
#   build-initramfs.sh inputs | build DIR  (writes DIR/initramfs.cpio.gz)
source "$(dirname "$0")/lib.sh"
META=linux-image-cloud-amd64
MODULES="virtio virtio_ring virtio_mmio virtio_pci virtio_blk virtio_net net_failover failover
  vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport virtio_rng
  crc16 mbcache jbd2 crc32c_generic crc32c_intel ext4 virtio_balloon virtio_pmem nd_pmem virtio_mem"
case "${1:-}" in
  inputs)
    apt_ready; p=$(kernel_pkg $META)
    echo "$p=$(pkg_version "$p")"; echo "busybox-static=$(pkg_version busybox-static)"
    echo "modules=$MODULES" ;;
  build)
    need_tools depmod:kmod cpio:cpio
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    kver=$(kernel_extract $META "$tmp/k")
    stage_busybox "$tmp/s"
    # shellcheck disable=SC2086
    stage_modules "$tmp/k" "$kver" "$tmp/s" $MODULES
    install -m 755 "$(dirname "$0")/init.sh" "$tmp/s/init"
    make_cpio "$tmp/s" "$2/initramfs.cpio.gz"
    ;;
  *) echo "usage: $0 inputs | build DIR" >&2; exit 2 ;;
esac
