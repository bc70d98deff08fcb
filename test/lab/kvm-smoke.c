/* A tiny KVM program (test/lab/lab.test.ts runs it inside the lab): checks the API version,
 * makes a VM with one vCPU, runs real-mode code that does `out 0x10, al` and `hlt`, and checks
 * both exits. Prints "KVM-SMOKE-OK" and exits 0 on success. */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#define FAIL(...) do { fprintf(stderr, "kvm-smoke: " __VA_ARGS__); fprintf(stderr, " (%s)\n", strerror(errno)); return 1; } while (0)

int main(void) {
  /* mov al, 0x42; out 0x10, al; hlt */
  const uint8_t code[] = {0xb0, 0x42, 0xe6, 0x10, 0xf4};
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) FAIL("open /dev/kvm");
  int api = ioctl(kvm, KVM_GET_API_VERSION, 0);
  if (api != 12) FAIL("KVM_GET_API_VERSION = %d, want 12", api);
  int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) FAIL("KVM_CREATE_VM");

  uint8_t *mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) FAIL("mmap");
  memcpy(mem, code, sizeof code);
  struct kvm_userspace_memory_region region = {
      .slot = 0, .guest_phys_addr = 0x1000, .memory_size = 0x1000, .userspace_addr = (uint64_t)mem};
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) FAIL("KVM_SET_USER_MEMORY_REGION");

  int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  if (vcpu < 0) FAIL("KVM_CREATE_VCPU");
  int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  if (run_size <= 0) FAIL("KVM_GET_VCPU_MMAP_SIZE");
  struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run == MAP_FAILED) FAIL("mmap kvm_run");

  struct kvm_sregs sregs;
  if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) FAIL("KVM_GET_SREGS");
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) FAIL("KVM_SET_SREGS");
  struct kvm_regs regs = {.rip = 0x1000, .rflags = 0x2};
  if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) FAIL("KVM_SET_REGS");

  if (ioctl(vcpu, KVM_RUN, 0) < 0) FAIL("KVM_RUN");
  if (run->exit_reason != KVM_EXIT_IO) FAIL("first exit %u, want KVM_EXIT_IO", run->exit_reason);
  uint8_t data = *((uint8_t *)run + run->io.data_offset);
  if (run->io.direction != KVM_EXIT_IO_OUT || run->io.port != 0x10 || run->io.size != 1 || data != 0x42)
    FAIL("io exit: dir %u port 0x%x size %u data 0x%x", run->io.direction, run->io.port, run->io.size, data);

  if (ioctl(vcpu, KVM_RUN, 0) < 0) FAIL("KVM_RUN 2");
  if (run->exit_reason != KVM_EXIT_HLT) FAIL("second exit %u, want KVM_EXIT_HLT", run->exit_reason);
  printf("KVM-SMOKE-OK api=%d out=0x%x\n", api, data);
  return 0;
}
