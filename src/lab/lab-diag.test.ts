import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cpuLines, hmp, SymbolMap } from './lab-diag.js';

const KALLSYMS = [
  'ffffffff81000000 T _text',
  'ffffffff81a4e8c0 t native_safe_halt',
  'ffffffff81a4e900 T default_idle',
  'ffffffffc0a01000 t svm_vcpu_run\t[kvm_amd]',
  'ffffffff82000000 D some_data',
].join('\n');

test('SymbolMap names text addresses from kallsyms, with the module, and nothing past a gap', () => {
  const m = new SymbolMap(KALLSYMS);
  assert.equal(m.name(0xffffffff81a4e8cbn), 'native_safe_halt+0xb');
  assert.equal(m.name(0xffffffff81a4e900n), 'default_idle+0x0');
  assert.equal(m.name(0xffffffffc0a01010n), 'svm_vcpu_run [kvm_amd]+0x10');
  assert.equal(m.name(0xffffffff80000000n), undefined); // below the first symbol
  assert.equal(m.name(0xffffffffc1a01010n), undefined); // 16 MiB past the last one
});

test('cpuLines keeps the CPU, RIP (named), CPL, HLT and CR3 of QEMU info registers', () => {
  const regs = [
    'CPU#0',
    'RAX=0000000000000000 RBX=ffffffff82613940 RCX=0000000000000001 RDX=0000000000000000',
    'RIP=ffffffff81a4e8cb RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1',
    'CR0=80050033 CR2=00007f0000001000 CR3=0000000006108000 CR4=00350ef0',
  ].join('\n');
  assert.deepEqual(cpuLines(regs, new SymbolMap(KALLSYMS)), [
    'CPU#0',
    '  RIP=ffffffff81a4e8cb <native_safe_halt+0xb> CPL=0 HLT=1',
    '  CR0=80050033 CR3=0000000006108000',
  ]);
});

test('hmp sends each command after a prompt and returns what it printed', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-hmp-'));
  const sock = join(dir, 'm.sock');
  const srv = net.createServer((c) => {
    c.write('QEMU 7.2 monitor - type help\r\n(qemu) ');
    let buf = '';
    c.on('data', (d) => {
      buf += d.toString();
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const cmd = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        c.write(`${cmd}\r\nout of ${cmd}\r\n(qemu) `);
      }
    });
  });
  await new Promise<void>((r) => srv.listen(sock, r));
  try {
    assert.deepEqual(await hmp(sock, ['info status', 'info cpus']), [
      'out of info status',
      'out of info cpus',
    ]);
    const none = await hmp(join(dir, 'absent.sock'), ['info status']);
    assert.match(none[0]!, /monitor: .*ENOENT/);
  } finally {
    srv.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
