#!/bin/sh
# Builds the micro benchmark guests (bench/guests/micro.S, linked with test/guests/tiny.ld) and
# the C KVM floor (bench/floor.c) into $1. Needs gcc and binutils.
# $2: LOOP_COUNT of the big port-I/O loop (default 1000000); a small one (1000) is built too.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:?usage: build.sh OUTDIR [LOOP_COUNT]}
big=${2:-1000000}
mkdir -p "$out"
build() { # name, cflags...
  name=$1; shift
  gcc -c -o "$out/$name.o" "$@" "$here/micro.S"
  ld -m elf_x86_64 -nostdlib -static -T "$repo/test/guests/tiny.ld" -z noexecstack -o "$out/$name.elf" "$out/$name.o"
  rm -f "$out/$name.o"
}
build mark -DMODE_MARK
build spin -DMODE_SPIN
build pioloop-small -DMODE_PIOLOOP -DLOOP_COUNT=1000
build pioloop-big -DMODE_PIOLOOP -DLOOP_COUNT="$big"
gcc -O2 -Wall -o "$out/floor" "$repo/bench/floor.c"
echo "$out"
