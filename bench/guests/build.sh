#!/bin/sh
# Builds the micro benchmark guests (bench/guests/micro.S, linked with test/guests/tiny.ld) and
# the C KVM floor (bench/floor.c) into $1. Needs gcc and binutils.
# $2: LOOP_COUNT of the big port-I/O loop (default 1000000); a small one (1000) is built too.
# $3, $4: request counts of the big virtio-blk read loops of 4 KiB and 64 KiB per request
# (defaults 30000 and 25000); small ones (500 and 200 requests) are built too.
# $5: ICMP echo round trips of the big virtio-net loop (default 5000); a small one (200) too.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:?usage: build.sh OUTDIR [LOOP_COUNT [BLK_4K_COUNT [BLK_64K_COUNT [NET_COUNT]]]]}
big=${2:-1000000}
blk4k=${3:-30000}
blk64k=${4:-25000}
net=${5:-5000}
mkdir -p "$out"
build() { # name, cflags...
  name=$1; shift
  gcc -c -o "$out/$name.o" "$@" "$here/micro.S"
  ld -m elf_x86_64 -nostdlib -static -T "$repo/test/guests/tiny.ld" -z noexecstack -o "$out/$name.elf" "$out/$name.o"
  rm -f "$out/$name.o"
}
build mark -DMODE_MARK
build spin -DMODE_SPIN
build idle -DMODE_IDLE
build pioloop-small -DMODE_PIOLOOP -DLOOP_COUNT=1000
build pioloop-big -DMODE_PIOLOOP -DLOOP_COUNT="$big"
build blk4k-small -DMODE_BLKLOOP -DBLK_BYTES=4096 -DBLK_COUNT=500
build blk4k-isr-small -DMODE_BLKLOOP -DBLK_BYTES=4096 -DBLK_COUNT=500 -DBLK_ISR
build blk4k-big -DMODE_BLKLOOP -DBLK_BYTES=4096 -DBLK_COUNT="$blk4k"
build blk4k-isr-big -DMODE_BLKLOOP -DBLK_BYTES=4096 -DBLK_COUNT="$blk4k" -DBLK_ISR
build blk64k-small -DMODE_BLKLOOP -DBLK_BYTES=65536 -DBLK_COUNT=200
build blk64k-big -DMODE_BLKLOOP -DBLK_BYTES=65536 -DBLK_COUNT="$blk64k"
build blkwatch -DMODE_BLKWATCH -DBLK_BYTES=512 -DBLK_COUNT=1
build netloop-small -DMODE_NETLOOP -DNET_COUNT=200
build netloop-big -DMODE_NETLOOP -DNET_COUNT="$net"
# The same with 2000 pause instructions after each round trip (~1 ms on our PVM host).
build netloop-gap-small -DMODE_NETLOOP -DNET_COUNT=50 -DNET_GAP=2000
build netloop-gap-big -DMODE_NETLOOP -DNET_COUNT=550 -DNET_GAP=2000
# 64 writes of 8 KiB from sector 0, a flush, then 64 reads that check what was written.
build blkrw-small -DMODE_BLKLOOP -DBLK_BYTES=8192 -DBLK_COUNT=64 -DBLK_WRITE_KEY=0xa5a5a5a5
gcc -O2 -Wall -o "$out/floor" "$repo/bench/floor.c"
echo "$out"
