#!/bin/busybox sh
# Lab /init: mount the host's / (9p tag "hostroot"), chroot into it with fresh /proc, /sys,
# /dev, and run $RUN/run.sh (written by the host) on ttyS0. The kernel console is ttyS1 so
# kernel messages never mix with the command's output. $RUN/exit gets the exit code.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
CMDLINE=$(cat /proc/cmdline)
# Module parameters from the kernel command line (module.param=value), as modprobe would pass
# them: busybox insmod does not read /proc/cmdline. The lab uses kvm_amd.npt=0 (src/lab/lab.ts).
while read -r m; do
  name=$(basename "$m" .ko | tr - _)
  args=
  for a in $CMDLINE; do
    case "$a" in "$name".*=*) args="$args ${a#"$name".}" ;; esac
  done
  # shellcheck disable=SC2086
  insmod "$m" $args 2>/dev/null
done </etc/modules.load
# One VM held open for the lab's life, so that the suite's VMs coming and going do not make the
# lab kernel rewrite its own text (lab-kvm-hold.c says why). Its mount namespace is this one's.
[ -e /dev/kvm ] && lab-kvm-hold &

RUN= NINEP=cache=mmap
for a in $CMDLINE; do
  case "$a" in
    lab.run=*) RUN=${a#lab.run=} ;;
    lab.9p=*) NINEP=${a#lab.9p=} ;;
  esac
done
fail() { echo "lab init: $*"; echo "lab init: $*" >/dev/ttyS0; poweroff -f; }
[ -n "$RUN" ] || fail "no lab.run= on the kernel command line"

R=/mnt
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,$NINEP hostroot $R ||
  fail "cannot mount the host's / over 9p"
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs tmpfs $R/run
ip link set lo up
echo "lab init: up, running $RUN/run.sh"
# The kernel's and its modules' text symbols, for naming the CPUs' addresses if the lab stops
# making progress (src/lab/lab-diag.ts; the lab boots with nokaslr). In the background: the
# command does not wait for it.
(grep ' [tT] ' /proc/kallsyms >$R$RUN/kallsyms.part && mv $R$RUN/kallsyms.part $R$RUN/kallsyms) &

# setsid -c: the command gets ttyS0 as its controlling tty (^C, job control).
setsid -c chroot $R /bin/sh "$RUN/run.sh" </dev/ttyS0 >/dev/ttyS0 2>&1
echo $? >$R$RUN/exit
sync
poweroff -f
