#!/bin/busybox sh
# Typervisor guest /init (initramfs and rootfs). Loads modules, prints the boot marker, then
# either switches to root=/dev/vdX or gives a shell on the console; powers off when it exits.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sys /sys 2>/dev/null
mount -t devtmpfs dev /dev 2>/dev/null
if [ -f /etc/modules.load ]; then
  while read -r m; do insmod "$m" 2>/dev/null; done </etc/modules.load
fi

root=
for a in $(cat /proc/cmdline); do
  case "$a" in root=/dev/vd*) root=${a#root=} ;; esac
done
if [ -n "$root" ] && [ ! -e /etc/typervisor-rootfs ]; then
  # Still in the initramfs: wait briefly for the disk, then hand over to it.
  i=0
  while [ ! -b "$root" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  if mount -t ext4 "$root" /newroot; then
    for d in proc sys dev; do mount --move /$d /newroot/$d; done
    init=/init; [ -x /newroot$init ] || init=/sbin/init
    exec switch_root /newroot $init
  fi
  echo "typervisor init: cannot mount $root, staying in the initramfs" >/dev/console
fi

# The boot is complete here (the final root is up). The marker goes to the console, and one
# byte to the VMM's boot timer, an MMIO byte at 0xc0000000 (busybox has no port-I/O tool; its
# devmem goes through /dev/mem). Under QEMU nothing is there and the write is ignored.
echo TYPERVISOR-BOOT-OK >/dev/console
[ -e /dev/mem ] && busybox devmem 0xc0000000 8 1 2>/dev/null

ip link set lo up 2>/dev/null
# cttyhack gives the shell the console as its controlling tty (job control, ^C).
# busybox by name: the Debian rootfs has no cttyhack applet links.
busybox setsid busybox cttyhack /bin/sh -l
busybox poweroff -f
