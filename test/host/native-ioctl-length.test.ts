/**
 * Needs the native shim and /dev/kvm. The shim's ioctl refuses a buffer shorter than the size
 * an _IOR/_IOW/_IOWR request encodes (EINVAL before any syscall), and lets through _IO requests,
 * integer arguments and buffers at least that long (KVM's variable-length structs).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { native, O_RDWR, isSyscallError } from '../../src/kvm/native.js';
import * as C from '../../src/kvm/constants.js';
import { kvmSkipReason } from './helpers.js';

const skip = kvmSkipReason() ?? false;

test('ioctlLengthOk: the encoded size against the buffer length', () => {
  const n = native();
  assert.equal(n.ioctlLengthOk(C.KVM_GET_REGS, 144), true);
  assert.equal(n.ioctlLengthOk(C.KVM_GET_REGS, 143), false);
  assert.equal(n.ioctlLengthOk(C.KVM_GET_REGS, 0), false);
  assert.equal(n.ioctlLengthOk(C.KVM_GET_SUPPORTED_CPUID, 8 + 40 * 100), true, 'header + entries');
  assert.equal(n.ioctlLengthOk(C.KVM_RUN, 0), true, '_IO carries no size');
  assert.equal(n.ioctlLengthOk(C.KVM_SET_IRQCHIP, 519), false, '_IOR too');
});

test(
  'ioctl: a short buffer is refused before the kernel sees it; the right one works',
  { skip },
  () => {
    const n = native();
    const kvm = n.open('/dev/kvm', O_RDWR, 0);
    try {
      const vm = n.ioctl(kvm, C.KVM_CREATE_VM, 0);
      try {
        const vcpu = n.ioctl(vm, C.KVM_CREATE_VCPU, 0);
        try {
          assert.throws(
            () => n.ioctl(vcpu, C.KVM_GET_REGS, new Uint8Array(143)),
            (e: unknown) =>
              isSyscallError(e, 'EINVAL') && /shorter than the request/.test(e.syscall),
          );
          const regs = new Uint8Array(144).fill(0xa5);
          assert.equal(n.ioctl(vcpu, C.KVM_GET_REGS, regs), 0);
          assert.notDeepEqual(regs, new Uint8Array(144).fill(0xa5), 'the kernel filled it');
          // A typed array's length in bytes counts, not its element count.
          n.ioctl(vcpu, C.KVM_GET_REGS, new BigUint64Array(18));
          assert.throws(() => n.ioctl(vcpu, C.KVM_GET_REGS, new BigUint64Array(17)), /EINVAL/);
          // An integer argument is passed as is (TUNSETOFFLOAD-style requests take values).
          assert.equal(n.ioctl(kvm, C.KVM_CHECK_EXTENSION, C.KVM_CAP_IOEVENTFD) > 0, true);
        } finally {
          n.close(vcpu);
        }
      } finally {
        n.close(vm);
      }
    } finally {
      n.close(kvm);
    }
  },
);
