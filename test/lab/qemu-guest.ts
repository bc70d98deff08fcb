// Run inside the lab by lab.test.ts: boots the guest kernel + initramfs with QEMU on the lab's
// (real AMD-V) KVM, sends shell input once the guest's boot marker shows (bytes sent earlier
// are lost while the guest's 8250 driver resets its FIFO), and prints the console output and
// BOOT-MS=<ms to marker>. Usage: node qemu-guest.js KERNEL INITRD 'shell input'
import { spawn } from 'node:child_process';

const [kernel, initrd, input] = process.argv.slice(2);
if (!kernel || !initrd || input === undefined) {
  console.error('usage: qemu-guest.js KERNEL INITRD INPUT');
  process.exit(2);
}
const t0 = Date.now();
const qemu = spawn(
  'qemu-system-x86_64',
  [
    ...['-M', 'microvm,acpi=on', '-enable-kvm', '-cpu', 'host', '-smp', '1', '-m', '256'],
    ...['-kernel', kernel, '-initrd', initrd, '-append', 'console=ttyS0 quiet panic=-1'],
    ...['-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot', '-serial', 'stdio'],
  ],
  { stdio: ['pipe', 'pipe', 'inherit'] },
);
let out = '';
let bootMs = -1;
let poweredOff = false;
qemu.stdout.on('data', (b: Buffer) => {
  out += b.toString();
  process.stdout.write(b);
  if (bootMs < 0 && out.includes('TYPERVISOR-BOOT-OK')) {
    bootMs = Date.now() - t0;
    // A moment for the shell to start reading.
    setTimeout(() => qemu.stdin.write(input.replace(/\\n/g, '\n')), 300);
  }
  // Seen once here: after the guest powered off, QEMU hung in the lab kernel (soft lockup in
  // KVM teardown under TCG). The guest's work is done; do not let that hang the lab.
  if (out.includes('reboot: Power down') && !poweredOff) {
    poweredOff = true;
    setTimeout(() => {
      console.error('qemu-guest: QEMU did not exit 20 s after the guest powered off; leaving it');
      console.log(`\nBOOT-MS=${bootMs} EXIT-MS=-1`);
      process.exit(0);
    }, 20_000).unref();
  }
});
qemu.stdin.on('error', () => {});
const timer = setTimeout(() => qemu.kill('SIGKILL'), 120_000);
qemu.on('close', (code) => {
  clearTimeout(timer);
  console.log(`\nBOOT-MS=${bootMs} EXIT-MS=${Date.now() - t0}`);
  process.exit(code ?? 1);
});
