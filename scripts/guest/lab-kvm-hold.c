/*
 * lab-kvm-hold: keeps one KVM VM (with an in-kernel irqchip and one vCPU that never runs)
 * open for the lab's whole life. Started by lab-init.sh once kvm_amd is loaded.
 *
 * Why: the lab kernel switches some of its static keys on when the first VM (or the first
 * vCPU with a software-disabled local APIC) appears, and off when the last one goes:
 * KVM's preempt notifiers (preempt_notifier_key, tested in __schedule) and its lapic keys.
 * Each switch rewrites kernel text live, through int3 (text_poke_bp). Under QEMU TCG with
 * both lab CPUs running, that rewrite of code the other CPU is executing has left it trapping
 * on the int3 for ever at __schedule+0x2ab (the preempt-notifier branch), with the other CPU
 * spinning on a lock: the whole lab silent, no watchdog report (docs/lab.md, 2026-12-04).
 * With one VM and one such vCPU held, those keys never go back to zero and the in-lab suite's
 * VMs starting and ending rewrite nothing.
 */
#include <fcntl.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define KVM_CREATE_VM 0xAE01
#define KVM_CREATE_IRQCHIP 0xAE60
#define KVM_CREATE_VCPU 0xAE41

int main(void) {
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) {
    perror("lab-kvm-hold: /dev/kvm");
    return 1;
  }
  int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) {
    perror("lab-kvm-hold: KVM_CREATE_VM");
    return 1;
  }
  if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) perror("lab-kvm-hold: KVM_CREATE_IRQCHIP");
  if (ioctl(vm, KVM_CREATE_VCPU, 0) < 0) perror("lab-kvm-hold: KVM_CREATE_VCPU");
  for (;;) pause();
}
