/**
 * Needs /dev/kvm, gcc and ld. Snapshots end to end with the counting tiny guest (count.elf
 * prints 1, 2, 3... in hex, one line every few ms): process A boots it, pauses and snapshots it
 * and is killed; process B loads the snapshot and the count goes on from where A stopped, with
 * no gap and no repeat. The same through `typervisor run --restore`. Then bad input: every bad
 * file or request is refused with 400 (or exit 2 and one line from the CLI), the process stays
 * "Not started" with nothing left of the failed load, and a correct load still works after it.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, readlinkSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { call, startServer, tempDir, type ServerProcess } from '../api/client.js';
import { guestPath, oneLine, runCli, tinyGuests } from './helpers.js';
import { BANNER, numbers, assertConsecutive, until, lineCount } from './counting-guest.js';

const guests = tinyGuests();
const T = { timeout: 60_000, skip: guests.skip ?? false };
const MEM_MIB = 32;
const PAGE = 4096;
const fault = (r: { json?: { fault_message?: string } }) => r.json?.fault_message ?? '';

/** What a process still holds of KVM: vCPU mappings, KVM fds and KVM's kernel tasks. */
function kvmLeftoversOf(pid: number): string[] {
  const out: string[] = [];
  for (const l of readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n'))
    if (l.includes('anon_inode:kvm')) out.push(`map ${l}`);
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const t = readlinkSync(`/proc/${pid}/fd/${fd}`);
      if (t.includes('kvm-vm') || t.includes('kvm-vcpu')) out.push(`fd ${fd} ${t}`);
    } catch {
      // closed meanwhile
    }
  }
  for (const t of readdirSync(`/proc/${pid}/task`)) {
    try {
      const comm = readFileSync(`/proc/${pid}/task/${t}/comm`, 'utf8').trim();
      if (comm.startsWith('kvm-')) out.push(`task ${t} ${comm}`);
    } catch {
      // exited meanwhile
    }
  }
  return out;
}

/** A state file with the header's container version set to `v` (checksum recomputed). */
function withContainerVersion(bytes: Buffer, v: number): Buffer {
  const b = Buffer.from(bytes);
  b.writeUInt32LE(v, 8);
  const end = b.length - 32;
  createHash('sha256').update(b.subarray(0, end)).digest().copy(b, end);
  return b;
}

describe('snapshots with the counting tiny guest (KVM)', () => {
  const servers: ServerProcess[] = [];
  after(async () => {
    for (const s of servers) await s.kill();
  });
  const serve = async (extra: string[] = []) => {
    const s = await startServer(extra);
    servers.push(s);
    return s;
  };
  const dir = tempDir();
  const state = join(dir, 'vm.snap');
  const mem = join(dir, 'vm.mem');
  let aOut = '';

  const load = (sock: string, extra: object = {}) =>
    call(sock, 'PUT', '/snapshot/load', {
      snapshot_path: state,
      mem_backend: { backend_type: 'File', backend_path: mem },
      ...extra,
    });

  test('A boots, pauses and snapshots; B loads and counts on', T, async () => {
    const a = await serve();
    assert.equal(
      (await call(a.sock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB }))
        .status,
      204,
    );
    assert.equal(
      (await call(a.sock, 'PUT', '/boot-source', { kernel_image_path: guestPath('count') })).status,
      204,
    );
    const started = await call(a.sock, 'PUT', '/actions', { action_type: 'InstanceStart' });
    assert.equal(started.status, 204, started.body);
    await until(() => lineCount(a.stdout()) >= 21, 20_000, 'A to count to 20');

    let r = await call(a.sock, 'PUT', '/snapshot/create', {
      snapshot_path: state,
      mem_file_path: mem,
    });
    assert.equal(r.status, 400);
    assert.equal(fault(r), 'Create snapshot error: the microVM must be paused (it is Running)');

    assert.equal((await call(a.sock, 'PATCH', '/vm', { state: 'Paused' })).status, 204);
    r = await call(
      a.sock,
      'PUT',
      '/snapshot/create',
      { snapshot_path: state, mem_file_path: mem },
      30_000,
    );
    assert.equal(r.status, 204, r.body);
    assert.equal((await call(a.sock, 'GET', '/')).json.state, 'Paused');
    await new Promise((res) => setTimeout(res, 200)); // the pipe's last bytes
    aOut = a.stdout();
    await new Promise((res) => setTimeout(res, 200));
    assert.equal(a.stdout(), aOut, 'A printed while paused');
    await a.kill();

    // The memory file: exactly the guest's RAM, sparse.
    const st = statSync(mem);
    assert.equal(st.size, MEM_MIB * 1024 * 1024);
    assert.ok(st.blocks * 512 < st.size / 2, `memory file not sparse: ${st.blocks * 512} bytes`);

    const b = await serve(['--level', 'Debug']);
    r = await load(b.sock, { resume_vm: true });
    assert.equal(r.status, 204, r.body);
    // The debug log's timeline: every step as `start+duration name`, in the load's order.
    await until(() => b.stderr().includes('load timeline'), 5_000, 'the load timeline');
    const timeline = /snapshot load timeline \(ms\): (.*)/.exec(b.stderr())?.[1];
    assert.ok(timeline, `no load timeline in the log: ${b.stderr().slice(-400)}`);
    const steps = timeline.split('; ');
    for (const st of steps) assert.match(st, /^\d+\.\d\d\+\d+\.\d\d \S/);
    const names = steps.map((st) => st.slice(st.indexOf(' ') + 1));
    const order = ['state file read', 'state file checksum', 'state file decoded', 'KVM_CREATE_VM'];
    order.push('memory file mapped', 'memory slots', 'KVM_CREATE_IRQCHIP', 'KVM_CREATE_PIT2');
    order.push('irqchips, PIT, kvmclock restored', 'vCPU 0 created', 'vCPU 0 restored');
    order.push('VMGenID notified', 'vCPU workers started', 'resume');
    const at = order.map((n) => names.indexOf(n));
    assert.ok(
      at.every((i, k) => i >= 0 && (k === 0 || i > at[k - 1]!)),
      `steps missing or out of order: ${timeline}`,
    );
    assert.equal((await call(b.sock, 'GET', '/')).json.state, 'Running');
    await until(() => lineCount(b.stdout()) >= 20, 20_000, 'B to count 20 more');
    const aNums = numbers(aOut);
    const all = numbers(aOut + b.stdout());
    assert.ok(aNums.length >= 20);
    assertConsecutive(all, 'A then B');
    assert.equal(all[0], 1);
    const bFirst = all[aNums.length]!;
    assert.ok(all[all.length - 1]! > bFirst);

    // The saved rsi is A's last complete number, or the next one when the pause fell mid-line.
    const ins = await runCli(['snapshot', 'inspect', state, '--json']);
    assert.equal(ins.code, 0, ins.stderr);
    const info = JSON.parse(ins.stdout) as {
      machine: { vcpus: number; memMib: number };
      vcpus: Array<{ regs: { rsi: string } }>;
    };
    assert.deepEqual(info.machine, { vcpus: 1, memMib: MEM_MIB });
    const rsi = Number(BigInt(info.vcpus[0]!.regs.rsi));
    const lastA = aNums[aNums.length - 1]!;
    assert.ok(rsi === lastA || rsi === lastA + 1, `rsi ${rsi}, A's last number ${lastA}`);
    const human = await runCli(['snapshot', 'inspect', state]);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /1 vCPU\(s\), 32 MiB/);
    await b.kill();
  });

  test('the same load in a rehearsed process (--rehearse), then a snapshot of it', T, async () => {
    assert.ok(aOut.length > 0, 'needs the snapshot of the first test');
    const b = await serve(['--rehearse']);
    const r = await load(b.sock, { resume_vm: true });
    assert.equal(r.status, 204, r.body);
    await until(() => lineCount(b.stdout()) >= 5, 20_000, 'the restored VM to count 5 more');
    assertConsecutive(numbers(aOut + b.stdout()), 'A then the rehearsed process');
    // Its vCPU runs on the rehearsal's reusable worker, which saves state as any other.
    assert.equal((await call(b.sock, 'PATCH', '/vm', { state: 'Paused' })).status, 204);
    const again = await call(
      b.sock,
      'PUT',
      '/snapshot/create',
      { snapshot_path: join(dir, 'vm2.snap'), mem_file_path: join(dir, 'vm2.mem') },
      30_000,
    );
    assert.equal(again.status, 204, again.body);
    assert.doesNotMatch(b.stderr(), /rehearsal/);
    await b.kill();
  });

  test('the same load through typervisor run --restore', T, async () => {
    assert.ok(aOut.length > 0, 'needs the snapshot of the first test');
    const r = await runCli(['run', '--restore', state, '--mem-file', mem], {
      timeoutMs: 20_000,
      onStdout: (out, child) => {
        if (lineCount(out) >= 20) child.kill('SIGTERM');
      },
    });
    assert.equal(r.timedOut, false, r.stderr);
    const all = numbers(aOut + r.stdout);
    assert.ok(all.length >= numbers(aOut).length + 19);
    assertConsecutive(all, 'A then run --restore');
  });

  test('bad input: 400 or exit 2, nothing changed, and a correct load still works', T, async () => {
    assert.ok(aOut.length > 0, 'needs the snapshot of the first test');
    const good = readFileSync(state);
    const bad = (name: string, bytes: Buffer | Uint8Array) => {
      const p = join(dir, name);
      writeFileSync(p, bytes);
      return p;
    };
    const N = good.readUInt32LE(16);
    const flipped = Buffer.from(good);
    flipped[24 + (N >> 1)]! ^= 0x40;
    const stateCases: Array<[string, string, RegExp]> = [
      ['cut in the header', bad('cut-header', good.subarray(0, 12)), /./],
      ['cut in the payload', bad('cut-payload', good.subarray(0, 24 + (N >> 1))), /./],
      ['cut in the trailer', bad('cut-trailer', good.subarray(0, good.length - 5)), /./],
      ['a flipped byte', bad('flipped', flipped), /checksum/],
      ['a version-2 header', bad('v2', withContainerVersion(good, 2)), /version 2/],
      ['not a snapshot', bad('junk', Buffer.from('hello, world\n')), /not a Typervisor snapshot/],
    ];
    const memBytes = readFileSync(mem);
    const memShort = bad('mem-short', memBytes.subarray(0, memBytes.length - PAGE));
    const memLong = bad('mem-long', Buffer.concat([memBytes, Buffer.alloc(PAGE)]));

    const c = await serve();
    const pid = c.child.pid!;
    const refused = async (body: object, re: RegExp, what: string) => {
      const r = await call(c.sock, 'PUT', '/snapshot/load', body);
      assert.equal(r.status, 400, `${what}: ${r.body}`);
      assert.match(fault(r), re, what);
      assert.equal((await call(c.sock, 'GET', '/')).json.state, 'Not started', what);
      assert.deepEqual(kvmLeftoversOf(pid), [], what);
    };
    const File = (p: string) => ({ backend_type: 'File', backend_path: p });
    for (const [what, p, re] of stateCases)
      await refused({ snapshot_path: p, mem_backend: File(mem) }, re, what);
    await refused(
      { snapshot_path: state, mem_backend: File(memShort) },
      /./,
      'memory one page short',
    );
    await refused(
      { snapshot_path: state, mem_backend: File(memLong) },
      /./,
      'memory one page long',
    );
    await refused(
      { snapshot_path: state, mem_backend: File(join(dir, 'nope')) },
      /./,
      'no memory file',
    );
    await refused(
      { snapshot_path: state, mem_backend: File(mem), extra: 1 },
      /unknown field `extra`/,
      'unknown field',
    );
    await refused(
      { snapshot_path: state },
      /either `mem_backend` or `mem_file_path` is required/,
      'neither',
    );
    await refused(
      { snapshot_path: state, mem_backend: File(mem), mem_file_path: mem },
      /exclusively is required/,
      'both',
    );
    await refused(
      {
        snapshot_path: state,
        mem_backend: File(mem),
        network_overrides: [{ iface_id: 'eth9', host_dev_name: 'tap9' }],
      },
      /Unknown Network Device/,
      'unknown iface',
    );
    await refused(
      { snapshot_path: state, mem_backend: File(mem), vsock_override: { uds_path: 'v.sock' } },
      /Unknown Vsock Device/,
      'no vsock device',
    );
    assert.match(
      fault(
        await call(c.sock, 'PUT', '/snapshot/create', { snapshot_path: 's', mem_file_path: 'm' }),
      ),
      /not supported before starting the microVM/,
    );

    // After all that, the same process loads the good snapshot (deprecated mem_file_path).
    let r = await call(c.sock, 'PUT', '/snapshot/load', {
      snapshot_path: state,
      mem_file_path: mem,
    });
    assert.equal(r.status, 204, r.body);
    assert.equal((await call(c.sock, 'GET', '/')).json.state, 'Paused');
    assert.equal(c.stdout(), '', 'a paused VM printed');
    assert.equal((await call(c.sock, 'PATCH', '/vm', { state: 'Resumed' })).status, 204);
    await until(() => lineCount(c.stdout()) >= 5, 20_000, 'the loaded VM to count');
    assertConsecutive(numbers(aOut + c.stdout()), 'A then the retried load');
    // A second load, and create while running, are refused.
    r = await load(c.sock);
    assert.equal(fault(r), 'The requested operation is not supported after starting the microVM.');
    r = await call(c.sock, 'PUT', '/snapshot/create', {
      snapshot_path: join(dir, 's2'),
      mem_file_path: join(dir, 'm2'),
    });
    assert.equal(fault(r), 'Create snapshot error: the microVM must be paused (it is Running)');
    await c.kill();

    // Load after a boot-shaping PUT is refused; the process is left as it was.
    const d = await serve();
    assert.equal(
      (await call(d.sock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB }))
        .status,
      204,
    );
    r = await load(d.sock);
    assert.equal(
      fault(r),
      'Loading a microVM snapshot not allowed after configuring boot-specific resources.',
    );
    assert.equal((await call(d.sock, 'GET', '/')).json.state, 'Not started');
    await d.kill();

    // The CLI: one line and exit 2.
    for (const [what, p] of stateCases.map(([w, p]) => [w, p] as const).slice(0, 2)) {
      const run = await runCli(['run', '--restore', p, '--mem-file', mem]);
      assert.equal(run.code, 2, `${what}: ${run.stderr}`);
      assert.match(oneLine(run.stderr), new RegExp(`^typervisor: cannot load snapshot ${p}: `));
      const ins = await runCli(['snapshot', 'inspect', p]);
      assert.equal(ins.code, 2, `${what}: ${ins.stderr}`);
      oneLine(ins.stderr);
    }
    const short = await runCli(['run', '--restore', state, '--mem-file', memShort]);
    assert.equal(short.code, 2, short.stderr);
    oneLine(short.stderr);
    const clash = await runCli(['run', '--restore', state, '--mem-file', mem, '--vcpus', '2']);
    assert.equal(clash.code, 2);
    assert.match(oneLine(clash.stderr), /--restore cannot be used with --vcpus/);
  });

  test(
    'typervisor snapshot create drives a running VM through pause, create and resume',
    T,
    async () => {
      const a = await serve();
      await call(a.sock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB });
      await call(a.sock, 'PUT', '/boot-source', { kernel_image_path: guestPath('count') });
      assert.equal(
        (await call(a.sock, 'PUT', '/actions', { action_type: 'InstanceStart' })).status,
        204,
      );
      await until(() => lineCount(a.stdout()) >= 3, 20_000, 'the guest to count');
      const s2 = join(dir, 'cli.snap');
      const m2 = join(dir, 'cli.mem');
      const r = await runCli(
        [
          'snapshot',
          'create',
          '--api-sock',
          a.sock,
          '--snapshot-path',
          s2,
          '--mem-file-path',
          m2,
          '--resume',
        ],
        { timeoutMs: 30_000 },
      );
      assert.equal(r.code, 0, r.stderr);
      assert.equal((await call(a.sock, 'GET', '/')).json.state, 'Running');
      assert.equal(statSync(m2).size, MEM_MIB * 1024 * 1024);
      const n = lineCount(a.stdout());
      await until(
        () => lineCount(a.stdout()) > n + 2,
        20_000,
        'the guest to count on after --resume',
      );
      const diff = await runCli([
        'snapshot',
        'create',
        '--api-sock',
        a.sock,
        '--snapshot-path',
        s2,
        '--mem-file-path',
        m2,
        '--type',
        'Diff',
      ]);
      assert.equal(diff.code, 2);
      assert.match(oneLine(diff.stderr), /^typervisor: Create snapshot error: .*Diff/);
      await a.kill();
    },
  );
});
