#!/bin/bash
# Guest kernel: the bzImage of Debian's cloud kernel (virtio drivers are modules there,
# loaded by our initramfs).
#   build-kernel.sh inputs     -> the package versions this image is made from (hashed by the CLI)
#   build-kernel.sh build DIR  -> writes DIR/vmlinuz
source "$(dirname "$0")/lib.sh"
META=linux-image-cloud-amd64
case "${1:-}" in
  inputs) apt_ready; p=$(kernel_pkg $META); echo "$p=$(pkg_version "$p")" ;;
  build)
    need_tools depmod:kmod
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    kver=$(kernel_extract $META "$tmp")
    cp "$tmp/boot/vmlinuz-$kver" "$2/vmlinuz"
    echo "$kver" >"$2/kernel.release"
    ;;
  *) echo "usage: $0 inputs | build DIR" >&2; exit 2 ;;
esac
