/** --seccomp-filter files: the accepted shape, and hostile files refused with a named problem. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_LOG } from './filter.js';
import {
  FilterFileError,
  loadUserFilter,
  MAX_FILTER_FILE_BYTES,
  parseUserFilter,
} from './user-filter.js';

const good = {
  main: { default_action: 'kill_process', filter_action: 'allow', filter: [{ syscall: 'read' }] },
  vcpu: {
    default_action: 'log',
    filter: [
      {
        syscall: 'ioctl',
        comment: 'KVM_RUN',
        args: [{ index: 1, type: 'dword', op: 'eq', val: 44672, comment: 'KVM_RUN' }],
      },
      {
        syscall: 'mmap',
        args: [{ index: 3, type: 'qword', op: 'masked_eq', mask: '0xffffffff00000000', val: 0 }],
      },
    ],
  },
  device: { filter: [{ syscall: 'epoll_wait' }] },
};

test('a well-formed file gives one policy and default action per role', () => {
  const f = parseUserFilter(JSON.stringify(good));
  assert.deepEqual(f.policies.main.rules, [
    { syscall: 'read' },
    { syscall: 'clone3', action: { kind: 'errno', errno: 38 } },
  ]);
  assert.deepEqual(f.policies.vcpu.rules[0], {
    syscall: 'ioctl',
    args: [{ index: 1, type: 'dword', op: 'eq', val: 44672n }],
  });
  assert.equal(f.policies.vcpu.rules[1]!.args![0]!.mask, 0xffffffff00000000n);
  assert.equal(f.defaultActions.main, SECCOMP_RET_KILL_PROCESS);
  assert.equal(f.defaultActions.vcpu, SECCOMP_RET_LOG);
  assert.equal(f.defaultActions.device, SECCOMP_RET_KILL_PROCESS);
});

test('hostile or wrong files are refused, naming the problem', () => {
  const bad = (mutate: (d: any) => unknown, re: RegExp) => {
    const d = structuredClone(good) as any;
    const r = mutate(d);
    const text = mutate.length === 0 ? (r as string) : JSON.stringify(d); // () => text: a raw file
    assert.throws(
      () => parseUserFilter(text),
      (e: unknown) => e instanceof FilterFileError && re.test((e as Error).message),
      re.source,
    );
  };
  bad(() => '{', /not JSON/);
  bad(() => '[]', /JSON object/);
  bad((d) => delete d.device, /no "device" filter/);
  bad((d) => (d.vmm = d.main), /unknown key "vmm"/);
  bad(
    (d) => (d.main.filter[0].syscall = 'execve_please'),
    /main\.filter\[0\]\.syscall: "execve_please" is not/,
  );
  bad((d) => (d.main.filter[0].syscall = '__proto__'), /is not an x86_64 system call/);
  bad((d) => (d.main.filter[0].syscall = 7), /must be a system call name/);
  bad((d) => (d.main.default_action = 'allow'), /default_action: must be one of/);
  bad((d) => (d.main.filter_action = 'kill_process'), /filter_action: only "allow"/);
  bad(
    (d) => (d.vcpu.filter[0].args[0].index = 6),
    /vcpu\.filter\[0\]\.args\[0\]\.index: must be 0 to 5/,
  );
  bad((d) => (d.vcpu.filter[0].args[0].op = 'gt'), /op: must be/);
  bad((d) => (d.vcpu.filter[0].args[0].type = 'byte'), /type: must be/);
  bad((d) => (d.vcpu.filter[0].args[0].val = -1), /non-negative integer/);
  bad((d) => (d.vcpu.filter[0].args[0].val = 2 ** 53), /non-negative integer/);
  bad((d) => (d.vcpu.filter[0].args[0].val = '0x100000000'), /does not fit a dword/);
  bad((d) => (d.vcpu.filter[0].args[0].mask = 1), /"mask" is only for "masked_eq"/);
  bad((d) => delete d.vcpu.filter[1].args[0].mask, /needs a "mask"/);
  bad((d) => (d.vcpu.filter[0].args = new Array(7).fill(d.vcpu.filter[0].args[0])), /at most 6/);
  bad((d) => (d.device.filter = new Array(1025).fill({ syscall: 'read' })), /at most 1024 rules/);
  bad((d) => (d.device.filter[0].extra = 1), /unknown key "extra"/);
  bad((d) => (d.device.filter[0].comment = 'x'.repeat(300)), /comment/);
  bad(() => ' '.repeat(MAX_FILTER_FILE_BYTES + 1), /larger than/);
  // Too many conditional rules for one program (4096 instructions).
  bad(
    (d) =>
      (d.device.filter = Array.from({ length: 1024 }, (_, i) => ({
        syscall: 'ioctl',
        args: [{ index: 1, type: 'qword', op: 'eq', val: i }],
      }))),
    /BPF program of \d+ instructions/,
  );
});

test('loadUserFilter: reads a file, refuses what is not a regular file', () => {
  const dir = mkdtempSync(join(tmpdir(), 'seccomp-filter-'));
  try {
    const f = join(dir, 'filter.json');
    writeFileSync(f, JSON.stringify(good));
    assert.deepEqual(loadUserFilter(f).policies.device.rules[0], { syscall: 'epoll_wait' });
    mkdirSync(join(dir, 'd'));
    assert.throws(() => loadUserFilter(join(dir, 'd')), /not a regular file/);
    assert.throws(() => loadUserFilter(join(dir, 'missing')), /cannot read: ENOENT/);
  } finally {
    rmSync(dir, { recursive: true });
  }
});
