/**
 * The BPF assembler and the policy compiler, checked by running the programs through a small
 * classic-BPF interpreter (the subset seccomp programs use, with the kernel's rules: forward
 * jumps only, loads aligned and inside struct seccomp_data) and by known encodings.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BPF_ABS,
  BPF_ALU,
  BPF_AND,
  BPF_JA,
  BPF_JEQ,
  BPF_JGE,
  BPF_JGT,
  BPF_JMP,
  BPF_JSET,
  BPF_K,
  BPF_LD,
  BPF_RET,
  BPF_W,
  BpfAssembler,
  encodeProgram,
  type Insn,
} from './bpf.js';
import {
  allowedSyscalls,
  AUDIT_ARCH_X86_64,
  compilePolicy,
  SECCOMP_RET_ALLOW,
  SECCOMP_RET_ERRNO,
  SECCOMP_RET_KILL_PROCESS,
  syscallNumber,
  type Policy,
} from './filter.js';
import { defaultPolicy, processPolicy, ROLES } from './roles.js';
import { KVM_IRQ_LINE, KVM_SET_USER_MEMORY_REGION } from '../../kvm/constants.js';

/** Runs a program on struct seccomp_data { nr, arch, ip, args[6] } and returns the action. */
function runBpf(prog: Insn[], nr: number, args: bigint[] = [], arch = AUDIT_ARCH_X86_64): number {
  const data = new DataView(new ArrayBuffer(64));
  data.setInt32(0, nr, true);
  data.setUint32(4, arch, true);
  args.forEach((a, i) => data.setBigUint64(16 + 8 * i, BigInt.asUintN(64, a), true));
  let A = 0;
  for (let pc = 0, steps = 0; pc < prog.length; pc++, steps++) {
    assert.ok(steps <= prog.length, 'no loops in classic BPF');
    const { code, jt, jf, k } = prog[pc]!;
    switch (code) {
      case BPF_LD | BPF_W | BPF_ABS:
        assert.ok(k % 4 === 0 && k + 4 <= 64, `load at ${k}`);
        A = data.getUint32(k, true);
        break;
      case BPF_ALU | BPF_AND | BPF_K:
        A = (A & k) >>> 0;
        break;
      case BPF_JMP | BPF_JA:
        pc += k;
        break;
      case BPF_JMP | BPF_JEQ | BPF_K:
        pc += A === k ? jt : jf;
        break;
      case BPF_JMP | BPF_JGE | BPF_K:
        pc += A >= k ? jt : jf;
        break;
      case BPF_JMP | BPF_JGT | BPF_K:
        pc += A > k ? jt : jf;
        break;
      case BPF_JMP | BPF_JSET | BPF_K:
        pc += (A & k) !== 0 ? jt : jf;
        break;
      case BPF_RET | BPF_K:
        return k;
      default:
        assert.fail(`unknown opcode ${code.toString(16)} at ${pc}`);
    }
    assert.ok(pc + 1 <= prog.length, 'jump past the end');
  }
  assert.fail('fell off the end of the program');
}

const nr = (name: string) => syscallNumber(name)!;

test('assembler: known encodings of struct sock_filter', () => {
  const a = new BpfAssembler();
  a.loadWord(4).jeq(AUDIT_ARCH_X86_64, 'ok', 0).ret(SECCOMP_RET_KILL_PROCESS).label('ok');
  a.ret(SECCOMP_RET_ALLOW);
  const bytes = encodeProgram(a.assemble());
  // BPF_STMT(BPF_LD|BPF_W|BPF_ABS, 4) = 20 00 00 00 04 00 00 00
  // BPF_JUMP(BPF_JMP|BPF_JEQ|BPF_K, 0xc000003e, 1, 0) = 15 00 01 00 3e 00 00 c0
  // BPF_STMT(BPF_RET|BPF_K, 0x80000000), BPF_STMT(BPF_RET|BPF_K, 0x7fff0000)
  assert.deepEqual(
    Buffer.from(bytes).toString('hex'),
    '2000000004000000' + '150001003e0000c0' + '0600000000000080' + '060000000000ff7f',
  );
});

test('assembler: refuses undefined labels, backward jumps and jumps beyond 255', () => {
  assert.throws(() => new BpfAssembler().jeq(1, 'nowhere', 0).ret(0).assemble(), /not defined/);
  const back = new BpfAssembler().label('top').loadWord(0).jeq(1, 'top', 0).ret(0);
  assert.throws(() => back.assemble(), /backward/);
  const far = new BpfAssembler().loadWord(0).jeq(1, 'end', 0);
  for (let i = 0; i < 256; i++) far.ret(0);
  far.label('end').ret(1);
  assert.throws(() => far.assemble(), /max 255/);
  assert.throws(() => new BpfAssembler().assemble(), /0 instructions/);
});

test('compiled policy: the architecture is checked first, x32 numbers are refused', () => {
  const prog = compilePolicy({ rules: [{ syscall: 'read' }] });
  assert.deepEqual(prog[0], { code: BPF_LD | BPF_W | BPF_ABS, jt: 0, jf: 0, k: 4 });
  assert.equal(runBpf(prog, nr('read')), SECCOMP_RET_ALLOW);
  assert.equal(
    runBpf(prog, nr('read'), [], 0x40000003 /* AUDIT_ARCH_I386 */),
    SECCOMP_RET_KILL_PROCESS,
  );
  assert.equal(runBpf(prog, nr('read') | 0x40000000), SECCOMP_RET_KILL_PROCESS);
  assert.equal(runBpf(prog, nr('write')), SECCOMP_RET_KILL_PROCESS);
});

test('compiled policy: argument conditions (dword, qword, ne, masked_eq) and alternatives', () => {
  const p: Policy = {
    rules: [
      { syscall: 'socket', args: [{ index: 0, type: 'dword', op: 'eq', val: 1n }] },
      { syscall: 'socket', args: [{ index: 0, type: 'dword', op: 'eq', val: 16n }] },
      { syscall: 'mmap', args: [{ index: 5, type: 'qword', op: 'eq', val: 0x1_0000_0002n }] },
      { syscall: 'kill', args: [{ index: 1, type: 'dword', op: 'ne', val: 9n }] },
      { syscall: 'tgkill', args: [{ index: 2, type: 'qword', op: 'ne', val: 0x5_0000_0009n }] },
      {
        syscall: 'ioctl',
        args: [
          { index: 1, type: 'qword', op: 'masked_eq', mask: 0xffffffff0000ff00n, val: 0xae00n },
        ],
      },
      { syscall: 'clone3', action: { kind: 'errno', errno: 38 } },
    ],
  };
  const prog = compilePolicy(p);
  const go = (name: string, args: bigint[]) => runBpf(prog, nr(name), args);
  assert.equal(go('socket', [1n]), SECCOMP_RET_ALLOW);
  assert.equal(go('socket', [16n]), SECCOMP_RET_ALLOW);
  assert.equal(go('socket', [2n]), SECCOMP_RET_KILL_PROCESS);
  assert.equal(go('socket', [0x1_0000_0001n]), SECCOMP_RET_ALLOW, 'dword looks at 32 bits');
  assert.equal(go('mmap', [0n, 0n, 0n, 0n, 0n, 0x1_0000_0002n]), SECCOMP_RET_ALLOW);
  assert.equal(
    go('mmap', [0n, 0n, 0n, 0n, 0n, 0x2n]),
    SECCOMP_RET_KILL_PROCESS,
    'qword: high word',
  );
  assert.equal(go('mmap', [0n, 0n, 0n, 0n, 0n, 0x1_0000_0003n]), SECCOMP_RET_KILL_PROCESS);
  assert.equal(go('kill', [1n, 15n]), SECCOMP_RET_ALLOW);
  assert.equal(go('kill', [1n, 9n]), SECCOMP_RET_KILL_PROCESS);
  assert.equal(go('tgkill', [0n, 0n, 0x5_0000_0009n]), SECCOMP_RET_KILL_PROCESS);
  assert.equal(go('tgkill', [0n, 0n, 0x9n]), SECCOMP_RET_ALLOW, 'ne: either word differs');
  assert.equal(go('tgkill', [0n, 0n, 0x5_0000_0008n]), SECCOMP_RET_ALLOW);
  const KVM_RUN = 0xae80n;
  const KVM_GET_REGS = 0x8090ae81n;
  const TUNSETIFF = 0x400454can;
  assert.equal(go('ioctl', [3n, KVM_RUN]), SECCOMP_RET_ALLOW);
  assert.equal(go('ioctl', [3n, KVM_GET_REGS]), SECCOMP_RET_ALLOW);
  assert.equal(go('ioctl', [3n, TUNSETIFF]), SECCOMP_RET_KILL_PROCESS);
  assert.equal(go('ioctl', [3n, 0x1_0000_ae80n]), SECCOMP_RET_KILL_PROCESS, 'upper bits set');
  assert.equal(go('clone3', []), SECCOMP_RET_ERRNO | 38);
  // After a failed argument check, the next call's comparison still sees its number.
  assert.equal(go('write', []), SECCOMP_RET_KILL_PROCESS);
});

test('compiled policy: a body longer than a conditional jump reaches past it with ja', () => {
  const rules = Array.from({ length: 120 }, (_, i) => ({
    syscall: 'ioctl',
    args: [{ index: 1, type: 'dword' as const, op: 'eq' as const, val: BigInt(0x1000 + i) }],
  }));
  const prog = compilePolicy({ rules: [...rules, { syscall: 'read' }] });
  assert.ok(prog.some((x) => x.code === (BPF_JMP | BPF_JA)));
  assert.equal(runBpf(prog, nr('ioctl'), [0n, 0x1000n + 119n]), SECCOMP_RET_ALLOW);
  assert.equal(runBpf(prog, nr('ioctl'), [0n, 0x2000n]), SECCOMP_RET_KILL_PROCESS);
  assert.equal(runBpf(prog, nr('read')), SECCOMP_RET_ALLOW);
});

test('compiled policy: unknown calls and out-of-range arguments are refused', () => {
  assert.throws(
    () => compilePolicy({ rules: [{ syscall: 'no_such_call' }] }),
    /unknown system call/,
  );
  assert.throws(
    () =>
      compilePolicy({
        rules: [{ syscall: 'read', args: [{ index: 6, type: 'dword', op: 'eq', val: 0n }] }],
      }),
    /argument index 6/,
  );
  assert.throws(
    () =>
      compilePolicy({
        rules: [{ syscall: 'read', args: [{ index: 0, type: 'dword', op: 'eq', val: 1n << 32n }] }],
      }),
    /does not fit a dword/,
  );
  assert.equal(syscallNumber('toString'), undefined, 'no prototype names');
});

test('default roles: KVM ioctls only on vCPUs, no execve or new processes anywhere, Unix sockets only', () => {
  const progs = Object.fromEntries(
    ROLES.map((r) => [
      r,
      compilePolicy(
        r === 'main'
          ? processPolicy({
              main: defaultPolicy('main'),
              vcpu: defaultPolicy('vcpu'),
              device: defaultPolicy('device'),
            })
          : defaultPolicy(r),
      ),
    ]),
  );
  const KVM_RUN = 0xae80n;
  for (const r of ROLES) {
    const p = progs[r]!;
    assert.equal(runBpf(p, nr('execve')), SECCOMP_RET_KILL_PROCESS, `${r}: execve`);
    assert.equal(runBpf(p, nr('execveat')), SECCOMP_RET_KILL_PROCESS, `${r}: execveat`);
    assert.equal(runBpf(p, nr('fork')), SECCOMP_RET_KILL_PROCESS, `${r}: fork`);
    assert.equal(runBpf(p, nr('ptrace')), SECCOMP_RET_KILL_PROCESS, `${r}: ptrace`);
    assert.equal(
      runBpf(p, nr('clone'), [0x11n /* SIGCHLD: a process */]),
      SECCOMP_RET_KILL_PROCESS,
    );
    assert.equal(
      runBpf(p, nr('socket'), [2n /* AF_INET */]),
      SECCOMP_RET_KILL_PROCESS,
      `${r}: inet`,
    );
    assert.equal(runBpf(p, nr('futex')), SECCOMP_RET_ALLOW, `${r}: futex`);
  }
  assert.equal(runBpf(progs.vcpu!, nr('ioctl'), [9n, KVM_RUN]), SECCOMP_RET_ALLOW);
  assert.equal(
    runBpf(progs.vcpu!, nr('ioctl'), [9n, 0x5401n /* TCGETS */]),
    SECCOMP_RET_KILL_PROCESS,
  );
  assert.equal(runBpf(progs.vcpu!, nr('socket'), [1n]), SECCOMP_RET_KILL_PROCESS);
  // An open in a worker is refused with EACCES, not a kill (glibc's malloc tries one; roles.ts).
  assert.equal(runBpf(progs.vcpu!, nr('openat')), SECCOMP_RET_ERRNO | 13);
  assert.equal(runBpf(progs.device!, nr('ioctl'), [9n, KVM_RUN]), SECCOMP_RET_KILL_PROCESS);
  // malloc on every thread: brk (the main arena, shared once threads outnumber arenas), mremap.
  for (const role of ['vcpu', 'device'] as const)
    for (const call of ['brk', 'mremap'])
      assert.equal(runBpf(progs[role]!, nr(call)), SECCOMP_RET_ALLOW, `${role}: ${call}`);
  // virtio-mem's slots and the devices' interrupts: KVM_SET_USER_MEMORY_REGION and
  // KVM_IRQ_LINE, no other KVM ioctl (KVM_IRQ_LINE_STATUS, 0xc008ae67, included).
  for (const req of [KVM_SET_USER_MEMORY_REGION, KVM_IRQ_LINE])
    assert.equal(runBpf(progs.device!, nr('ioctl'), [9n, BigInt(req)]), SECCOMP_RET_ALLOW);
  assert.equal(runBpf(progs.device!, nr('ioctl'), [9n, 0xc008ae67n]), SECCOMP_RET_KILL_PROCESS);
  assert.equal(runBpf(progs.device!, nr('ioctl'), [9n, 0x4020ae47n]), SECCOMP_RET_KILL_PROCESS);
  assert.equal(runBpf(progs.device!, nr('socket'), [1n]), SECCOMP_RET_ALLOW);
  assert.equal(runBpf(progs.device!, nr('openat'), [0n, 0n, 0o2000000n]), SECCOMP_RET_ERRNO | 13);
  assert.equal(
    runBpf(progs.device!, nr('openat'), [0n, 0n, 0o12000000n /* O_PATH | O_CLOEXEC */]),
    SECCOMP_RET_ALLOW,
  );
  // io_uring: the device worker drives its rings (io_uring_enter) but can neither make a new
  // one nor register anything on one (its rings were set up under the process filter).
  assert.equal(runBpf(progs.device!, nr('io_uring_enter')), SECCOMP_RET_ALLOW);
  for (const call of ['io_uring_setup', 'io_uring_register']) {
    assert.equal(runBpf(progs.device!, nr(call)), SECCOMP_RET_KILL_PROCESS, `device: ${call}`);
    assert.equal(runBpf(progs.main!, nr(call)), SECCOMP_RET_ALLOW, `process: ${call}`);
  }
  assert.equal(runBpf(progs.vcpu!, nr('io_uring_enter')), SECCOMP_RET_KILL_PROCESS);
  // The process list (main's filter) still allows opens: the workers' errno rule is not in it.
  assert.equal(runBpf(progs.main!, nr('openat'), [0n, 0n, 0n]), SECCOMP_RET_ALLOW);
  assert.equal(
    runBpf(progs.main!, nr('clone'), [0x3d0f00n /* pthread_create */]),
    SECCOMP_RET_ALLOW,
  );
  assert.equal(runBpf(progs.main!, nr('clone3')), SECCOMP_RET_ERRNO | 38);
});

test('default roles: the process list holds every worker list (so a worker ends with its own)', () => {
  const proc = new Set(
    allowedSyscalls(
      processPolicy({
        main: defaultPolicy('main'),
        vcpu: defaultPolicy('vcpu'),
        device: defaultPolicy('device'),
      }),
    ),
  );
  for (const r of ['vcpu', 'device'] as const)
    for (const s of allowedSyscalls(defaultPolicy(r))) assert.ok(proc.has(s), `${r}: ${s}`);
});
