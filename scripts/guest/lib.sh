# Shared helpers for the guest image recipes (sourced, not run).
# Images are built only from Debian packages: apt-get download + dpkg-deb -x.
set -euo pipefail

CACHE="${TYPERVISOR_CACHE:-$HOME/.cache/typervisor}"
DEBS="$CACHE/debs"

log() { echo "[guest] $*" >&2; }

# A fresh CI machine may have no package lists yet.
apt_ready() {
  if ! ls /var/lib/apt/lists/*Packages* >/dev/null 2>&1; then
    log "apt-get update (no package lists yet)"
    apt-get update -qq >&2
  fi
}

# Host tools the recipes run; installed on demand so CI needs no manual step.
need_tools() { # need_tools cmd:package ...
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if ((${#missing[@]})); then
    apt_ready
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  fi
}

# Candidate version of a package, as apt would install it.
pkg_version() { apt-cache show --no-all-versions "$1" | sed -n 's/^Version: //p' | head -1; }

# linux-image-cloud-amd64 is a metapackage; this returns the real image package name.
kernel_pkg() {
  apt-cache show --no-all-versions "$1" | sed -n 's/^Depends: //p' | head -1 |
    tr ',' '\n' | sed -n 's/^ *\(linux-image-[^ ]*\).*/\1/p' | head -1
}

# Download a package (cached by its versioned file name) and unpack it into $2.
deb_extract() { # deb_extract pkg dir
  local pkg=$1 dir=$2 ver file
  ver=$(pkg_version "$pkg")
  mkdir -p "$DEBS" "$dir"
  file=$(ls "$DEBS/${pkg}_"*"${ver#*:}"_*.deb 2>/dev/null | head -1 || true)
  if [[ -z "$file" ]]; then
    log "downloading $pkg $ver"
    # apt drops privileges to _apt, which cannot write to /root; download via a temp dir it can reach.
    local tmp
    tmp=$(mktemp -d)
    chmod 777 "$tmp"
    (cd "$tmp" && apt-get download -qq "$pkg=$ver" >&2)
    mv "$tmp"/*.deb "$DEBS/"
    rmdir "$tmp"
    file=$(ls "$DEBS/${pkg}_"*"${ver#*:}"_*.deb | head -1)
  fi
  dpkg-deb -x "$file" "$dir"
}

# Unpack a kernel image package; prints its version string (e.g. 6.1.0-56-cloud-amd64).
kernel_extract() { # kernel_extract metapkg dir
  local pkg kver
  pkg=$(kernel_pkg "$1")
  deb_extract "$pkg" "$2"
  kver=$(ls "$2/lib/modules" | head -1)
  depmod -b "$2" "$kver" # the .deb ships no modules.dep; postinst normally makes it
  echo "$kver"
}

# Copy modules and their dependencies (in load order, deduplicated, decompressed because
# busybox insmod may not read .ko.xz) into $stage/lib/modules, and list them in
# $stage/etc/modules.load. Modules built into the kernel or absent are skipped quietly.
stage_modules() { # stage_modules kroot kver stage mod...
  local kroot=$1 kver=$2 stage=$3 m path rel
  shift 3
  mkdir -p "$stage/lib/modules" "$stage/etc"
  : >"$stage/etc/modules.load"
  for m in "$@"; do
    modprobe -d "$kroot" -S "$kver" --show-depends "$m" 2>/dev/null || true
  done | sed -n 's/^insmod \([^ ]*\).*/\1/p' | awk '!seen[$0]++' | while read -r path; do
    rel=$(basename "$path")
    case "$rel" in
      *.xz) xz -dc "$path" >"$stage/lib/modules/${rel%.xz}"; rel=${rel%.xz} ;;
      *.zst) zstd -qdc "$path" >"$stage/lib/modules/${rel%.zst}"; rel=${rel%.zst} ;;
      *) cp "$path" "$stage/lib/modules/$rel" ;;
    esac
    echo "/lib/modules/$rel" >>"$stage/etc/modules.load"
  done
}

# A busybox root: the static binary, applet links, and the nodes the kernel needs before
# /init runs (/dev/console). We run as root, so mknod in the staging dir is enough.
stage_busybox() { # stage_busybox stage
  local stage=$1 d
  d=$(mktemp -d)
  deb_extract busybox-static "$d"
  mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,newroot}
  cp "$d/bin/busybox" "$stage/bin/busybox"
  rm -rf "$d"
  # Relative links so they also resolve from outside (chroot-free inspection).
  for a in $("$stage/bin/busybox" --list); do
    [[ -e "$stage/bin/$a" ]] || ln -s busybox "$stage/bin/$a"
  done
  mknod -m 600 "$stage/dev/console" c 5 1
  mknod -m 666 "$stage/dev/null" c 1 3
}

# The ELF vmlinux inside an xz bzImage (Debian's kernels are xz), like the kernel's
# scripts/extract-vmlinux. QEMU boots it through its PVH note.
vmlinux_from_bzimage() { # vmlinux_from_bzimage bzImage out
  local off
  off=$(LC_ALL=C grep -aboP '\xfd7zXZ\x00' "$1" | head -1 | cut -d: -f1)
  [[ -n "$off" ]] || { log "no xz payload in $1"; return 1; }
  tail -c +$((off + 1)) "$1" | xz -dc >"$2" 2>/dev/null || true # trailing data after the stream
  [[ "$(head -c 4 "$2" | od -An -c | tr -d ' ')" == '177ELF' ]] || { log "bad vmlinux from $1"; return 1; }
}

# newc cpio, gzip'd, with stable ordering.
make_cpio() { # make_cpio stage out
  (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9n >"$2"
}
