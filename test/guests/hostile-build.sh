#!/bin/sh
# Builds the hostile tiny guests (hostile-guests.S, linked with tiny.ld) into $1 (default:
# test/guests/build). Needs gcc and binutils. Sizes are the defaults of hostile-guests.S unless
# named here.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
mkdir -p "$out"
build() { # name, cflags...
  name=$1; shift
  gcc -c -o "$out/$name.o" "$@" ${EXTRA_CFLAGS:-} "$here/hostile-guests.S"
  ld -m elf_x86_64 -nostdlib -static -T "$here/tiny.ld" -z noexecstack -o "$out/$name.elf" "$out/$name.o"
  rm -f "$out/$name.o"
}
# vsock: 256 OP_RW packets per kick, an rng probe every 64 kicks.
build hostile-vsock -DMODE_VSOCK
# blk aliasing: 1022 x 1 MiB of one buffer per request (a 1022 MiB read), one per kick.
build hostile-blk -DMODE_BLK -DBLK_BATCH=1
# kick storm: 254 x 64 KiB per request (16 MiB), the ring kept 256 requests full; an rng request
# polled at most 0x10000 times (about a second: a poll is POLL_US, 15 us, of the TSC calibrated
# against the PIT; each poll also tops up the ring).
build hostile-storm -DMODE_STORM -DBLK_SEGS=254 -DBLK_SEG_BYTES=65536 -DBLK_BATCH=256 -DRNG_POLL_MAX=0x10000
# net: an RX chain of 1024 descriptors (1025 iovecs with the device's spill buffer).
build hostile-net -DMODE_NET
# vsock: one TX buffer outside guest RAM; DEVICE_NEEDS_RESET expected.
build hostile-vsock-bad -DMODE_VSOCK_BAD
echo "$out"
