/*
 * The C floor for the micro benchmark: the least a VMM must do to run a PVH ELF guest on KVM.
 * open /dev/kvm, create a VM with one memory slot (anonymous, MAP_NORESERVE), load the ELF's
 * PT_LOAD segments, one vCPU in 32-bit protected mode with paging off (PVH: flat CS/DS, CR0 =
 * PE|ET, EBX -> start_info, which these guests ignore), then KVM_RUN until the guest resets.
 * No irqchip, no PIT, no CPUID or MSR setup, no ACPI or boot tables: a floor, not a VMM.
 *
 *   floor ELF [MiB]   (default 64 MiB)
 *
 * Port 0x3f8 output goes straight to stdout (write(2) per exit, unbuffered: the harness times
 * the first byte, as for the other VMMs); port 0x3f0 is the boot marker; 0xfe to port 0x64
 * (the i8042 reset) exits 0; HLT exits 0; a shutdown, failed entry or internal error exits 1.
 * FLOOR_TIMES=1 prints the marker and exit times since process start (CLOCK_MONOTONIC from
 * the process start time in /proc/self/stat is too coarse, so from main()) on stderr.
 */
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
  fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
  exit(1);
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static uint32_t pvh_entry(const uint8_t *f, size_t n, const Elf64_Ehdr *eh) {
  for (int i = 0; i < eh->e_phnum; i++) {
    const Elf64_Phdr *ph = (const Elf64_Phdr *)(f + eh->e_phoff + (size_t)i * eh->e_phentsize);
    if (ph->p_type != PT_NOTE || ph->p_offset + ph->p_filesz > n) continue;
    size_t off = ph->p_offset, end = ph->p_offset + ph->p_filesz;
    while (off + 12 <= end) {
      const uint32_t *nh = (const uint32_t *)(f + off);
      uint32_t namesz = nh[0], descsz = nh[1], type = nh[2];
      size_t name = off + 12, desc = name + ((namesz + 3) & ~3u);
      if (desc + descsz > end) break;
      if (type == 18 && namesz == 4 && memcmp(f + name, "Xen", 4) == 0 && descsz >= 4)
        return *(const uint32_t *)(f + desc);
      off = desc + ((descsz + 3) & ~3u);
    }
  }
  return (uint32_t)eh->e_entry;
}

int main(int argc, char **argv) {
  double t0 = now_ms(), marker = -1;
  if (argc < 2) {
    fprintf(stderr, "usage: floor ELF [MiB]\n");
    return 2;
  }
  size_t mem_size = (size_t)(argc > 2 ? atoi(argv[2]) : 64) << 20;
  int times = getenv("FLOOR_TIMES") != NULL;

  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) die("/dev/kvm");
  int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) die("KVM_CREATE_VM");
  uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) die("mmap guest memory");
  struct kvm_userspace_memory_region region = {
      .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size, .userspace_addr = (uintptr_t)mem};
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");

  int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
  if (fd < 0) die(argv[1]);
  struct stat st;
  if (fstat(fd, &st) < 0) die("fstat");
  uint8_t *f = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (f == MAP_FAILED) die("mmap ELF");
  const Elf64_Ehdr *eh = (const Elf64_Ehdr *)f;
  if ((size_t)st.st_size < sizeof *eh || memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0) {
    fprintf(stderr, "floor: %s is not an ELF file\n", argv[1]);
    return 2;
  }
  for (int i = 0; i < eh->e_phnum; i++) {
    const Elf64_Phdr *ph = (const Elf64_Phdr *)(f + eh->e_phoff + (size_t)i * eh->e_phentsize);
    if (ph->p_type != PT_LOAD) continue;
    if (ph->p_paddr + ph->p_memsz > mem_size || ph->p_offset + ph->p_filesz > (size_t)st.st_size) {
      fprintf(stderr, "floor: segment outside memory or file\n");
      return 2;
    }
    memcpy(mem + ph->p_paddr, f + ph->p_offset, ph->p_filesz);
  }
  uint32_t entry = pvh_entry(f, st.st_size, eh);

  int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  if (vcpu < 0) die("KVM_CREATE_VCPU");
  int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  if (run_size < 0) die("KVM_GET_VCPU_MMAP_SIZE");
  struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run == MAP_FAILED) die("mmap kvm_run");

  struct kvm_sregs sregs;
  if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
  struct kvm_segment code = {.base = 0, .limit = 0xffffffff, .selector = 0x08, .type = 0xb,
                             .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1};
  struct kvm_segment data = code;
  data.selector = 0x10;
  data.type = 0x3;
  sregs.cs = code;
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
  sregs.cr0 = (sregs.cr0 & ~((1ULL << 29) | (1ULL << 30))) | 1 | (1 << 4); /* PE|ET, no CD/NW */
  sregs.cr4 = 0;
  sregs.efer = 0;
  if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
  struct kvm_regs regs = {0};
  regs.rip = entry;
  regs.rbx = 0x6000; /* PVH start_info (not written: these guests do not read it) */
  regs.rsp = 0x8ff0;
  regs.rflags = 2;
  if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

  unsigned long exits = 0;
  for (;;) {
    if (ioctl(vcpu, KVM_RUN, 0) < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      die("KVM_RUN");
    }
    exits++;
    switch (run->exit_reason) {
    case KVM_EXIT_IO: {
      uint8_t *p = (uint8_t *)run + run->io.data_offset;
      size_t len = (size_t)run->io.size * run->io.count;
      if (run->io.direction == KVM_EXIT_IO_IN) {
        memset(p, 0xff, len);
      } else if (run->io.port == 0x3f8) {
        if (write(1, p, len) < 0) { /* stdout gone: keep running */ }
      } else if (run->io.port == 0x3f0) {
        if (marker < 0) marker = now_ms();
      } else if (run->io.port == 0x64 && p[0] == 0xfe) {
        if (times)
          fprintf(stderr, "floor: marker %.3f ms, exit %.3f ms after main(), %lu exits\n",
                  marker - t0, now_ms() - t0, exits);
        return 0;
      }
      break;
    }
    case KVM_EXIT_MMIO:
      if (!run->mmio.is_write) memset(run->mmio.data, 0xff, run->mmio.len);
      break;
    case KVM_EXIT_HLT:
      return 0;
    case KVM_EXIT_SHUTDOWN:
      fprintf(stderr, "floor: triple fault\n");
      return 1;
    case KVM_EXIT_FAIL_ENTRY:
      fprintf(stderr, "floor: failed entry 0x%llx\n",
              (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
      return 1;
    case KVM_EXIT_INTERNAL_ERROR:
      fprintf(stderr, "floor: KVM internal error %u\n", run->internal.suberror);
      return 1;
    default:
      fprintf(stderr, "floor: unexpected exit %u\n", run->exit_reason);
      return 1;
    }
  }
}
