#!/bin/sh
# Builds every tiny guest variant into $1 (default: test/guests/build). Needs gcc and binutils.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
mkdir -p "$out"
for mode in POWEROFF RESET TRIPLE SPIN PIOLOOP PIOSPIN MMIO ECHO RTC I8042 CONSOLEFLOOD CONSOLEBURST COUNT COUNTMEM CPUID; do
  name=$(echo "$mode" | tr 'A-Z' 'a-z')
  gcc -c -o "$out/$name.o" -DMODE_$mode ${EXTRA_CFLAGS:-} "$here/tiny.S"
  ld -m elf_x86_64 -nostdlib -static -T "$here/tiny.ld" -z noexecstack -o "$out/$name.elf" "$out/$name.o"
  rm -f "$out/$name.o"
done
echo "$out"
