/**
 * The Uffd memory backend and our page-fault handler (`typervisor uffd-handler`, a process of
 * its own), against the real kernel:
 *   - the handshake on the wire, byte for byte as Firecracker's handlers parse it (JSON fields
 *     and types, one message, exactly one fd attached and it is a userfaultfd);
 *   - our handler with this process as the "VMM" (no KVM): pages come from the memory file on
 *     first touch, only the pages touched, and a page madvised away (UFFD_EVENT_REMOVE) comes
 *     back as zeros; it exits when the VMM's socket closes, with its counts;
 *   - a hostile handshake (bad JSON, a region outside the file, no fd, the wrong kind of fd)
 *     ends the handler with a one-line error and exit 1;
 *   - with KVM and the counting tiny guest: snapshot, stop, load with the Uffd backend served by
 *     our handler: the count continues exactly, and the handler served some but not all pages;
 *   - a load with no handler listening, a handler that never reads, or one that hangs up, is
 *     refused (SnapshotError; 400 through the API) and leaves nothing behind; a File load then
 *     works.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  existsSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import {
  EFD_NONBLOCK,
  MAP_ANONYMOUS,
  MAP_NORESERVE,
  MAP_PRIVATE,
  native,
  PROT_READ,
  PROT_WRITE,
} from '../../src/kvm/native.js';
import {
  encodeUffdRegions,
  UFFD_API,
  UFFD_FEATURE_EVENT_REMOVE,
  UFFDIO_API,
  UFFDIO_REGISTER,
  UFFDIO_REGISTER_MODE_MISSING,
} from '../../src/uffd/protocol.js';
import { buildVm } from '../../src/vmm/builder.js';
import { validateResources } from '../../src/vmm/resources.js';
import {
  createSnapshot,
  loadSnapshot,
  SnapshotError,
  type LoadParams,
} from '../../src/vmm/snapshot.js';
import { uffdGuestMemory } from '../../src/vmm/snapshot-uffd.js';
import { call, startServer } from '../api/client.js';
import {
  eventually,
  guestPath,
  kvmLeftovers,
  runCli,
  tempDir,
  threadCount,
  tinyGuests,
  type CliResult,
} from './helpers.js';
import { counts, countsIn, cutLine, lines, stop } from './counting-guest.js';

const PAGE = 4096;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const MADV_DONTNEED = 4;

interface Handler {
  /** Resolves once it listens. */
  listening: Promise<void>;
  done: Promise<CliResult>;
  child: () => ChildProcess | undefined;
}

/** Starts `typervisor uffd-handler` as a child process. */
function startHandler(sock: string, mem: string, opts: { positional?: boolean } = {}): Handler {
  let child: ChildProcess | undefined;
  let ready!: () => void;
  const listening = new Promise<void>((r) => (ready = r));
  const args = opts.positional ? [sock, mem] : ['--socket', sock, '--mem-file', mem];
  const done = runCli(['uffd-handler', ...args], {
    timeoutMs: 60_000,
    onStdout: (out, c) => {
      child = c;
      if (out.includes(`listening on ${sock}`)) ready();
    },
  });
  // A handler that fails before listening resolves `listening` too (its exit is checked).
  void done.then(() => ready());
  return { listening, done, child: () => child };
}

/** The handler's final counts, from its last line. */
function countsOf(r: CliResult): Record<string, number> {
  const m = /the VMM went away: (.*)$/m.exec(r.stdout);
  assert.ok(m, `no final line: ${r.stdout} ${r.stderr}`);
  return Object.fromEntries(
    m[1]!.split(' ').map((kv) => {
      const [k, v] = kv.split('=');
      return [k!, Number(v)];
    }),
  );
}

/** A memory file of `pages` pages, page p filled with byte (p + 1) & 0xff. */
function patternFile(dir: string, pages: number): string {
  const b = Buffer.alloc(pages * PAGE);
  for (let p = 0; p < pages; p++) b.fill((p + 1) & 0xff, p * PAGE, (p + 1) * PAGE);
  const path = join(dir, 'mem');
  writeFileSync(path, b);
  return path;
}

function connectTo(sock: string): number {
  const n = native();
  const fd = n.unixSocket();
  assert.equal(n.connect(fd, sock), 0);
  return fd;
}

describe('the handshake and our handler, this process as the VMM (no KVM)', () => {
  test('the handshake is what Firecracker sends: JSON regions, one message, one userfaultfd', async () => {
    const n = native();
    const dir = tempDir();
    const sock = join(dir, 'h.sock');
    const listener = n.unixSocket();
    n.bindListen(listener, sock, 1);
    const regions = [
      { base: 0, size: 16 * PAGE, fileOffset: 0 },
      { base: 0x1_0000_0000, size: 8 * PAGE, fileOffset: 16 * PAGE },
    ];
    // Accept and read while the VMM side waits for the message to be taken.
    let conn = -1;
    let got: { bytes: number; fds: number[] } = { bytes: -1, fds: [] };
    const buf = new Uint8Array(1024); // Firecracker's example reads into 1024 bytes
    let fdKind = '';
    const server = setInterval(() => {
      if (conn < 0) conn = n.accept(listener);
      if (conn >= 0 && got.bytes < 0) {
        got = n.recvFds(conn, buf, 4);
        if (got.fds[0] !== undefined) fdKind = readlinkSync(`/proc/self/fd/${got.fds[0]}`);
      }
    }, 1);
    let gone = '';
    const mem = await uffdGuestMemory(sock, regions, {
      watchMs: 20,
      onHandlerGone: (m) => (gone = m),
    }).finally(() => clearInterval(server));
    try {
      assert.equal(got.fds.length, 1, 'exactly one fd, as SCM_RIGHTS');
      assert.equal(fdKind, 'anon_inode:[userfaultfd]');
      const text = Buffer.from(buf.subarray(0, got.bytes)).toString('utf8');
      assert.equal(text, mem.handshake);
      const addrs = mem.ram.buffers.map((b) => n.bufferAddress(b));
      // serde_json's output for Vec<GuestRegionUffdMapping>, field for field (persist.rs).
      assert.equal(
        text,
        `[{"base_host_virt_addr":${addrs[0]},"size":65536,"offset":0,"page_size":4096,"page_size_kib":4096},` +
          `{"base_host_virt_addr":${addrs[1]},"size":32768,"offset":65536,"page_size":4096,"page_size_kib":4096}]`,
      );
      // Types as serde wants them: u64/usize are plain non-negative integers.
      for (const r of JSON.parse(text) as Array<Record<string, unknown>>) {
        assert.deepEqual(Object.keys(r), [
          'base_host_virt_addr',
          'size',
          'offset',
          'page_size',
          'page_size_kib',
        ]);
        for (const v of Object.values(r)) assert.ok(Number.isSafeInteger(v) && (v as number) >= 0);
      }
      assert.ok(!/[\s.eE-]/.test(text.replace(/"[a-z_]+"/g, '')), 'no spaces, fractions, signs');
      assert.deepEqual(mem.layout.hostAddrs, addrs);
      assert.equal(mem.layout.memfd, -1);
      // The handler hanging up later is reported.
      await sleep(60);
      assert.equal(gone, '', 'reported while connected');
      n.close(conn);
      conn = -1;
      assert.ok(await eventually(() => gone !== '', 2000), 'a hang-up was not reported');
      assert.match(gone, /the page-fault handler at .*h\.sock hung up/);
    } finally {
      for (const fd of [...got.fds, conn, listener]) if (fd >= 0) n.close(fd);
      mem.ram.unmap();
    }
  });

  test('our handler serves touched pages from the file, zeros after a remove, exits with the VMM', async () => {
    const n = native();
    const dir = tempDir();
    const pages = 64;
    const memFile = patternFile(dir, pages);
    const sock = join(dir, 'h.sock');
    // As Firecracker's tests start their example handler: `handler SOCK MEM`.
    const h = startHandler(sock, memFile, { positional: true });
    await h.listening;
    // Two regions: file pages [0, 32) and [32, 64), mapped separately, as guest RAM is.
    const maps = [0, 1].map(() =>
      n.mmap(32 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
    );
    const uffd = n.userfaultfd(0);
    const sockFd = n.unixSocket();
    try {
      n.ioctl(uffd, UFFDIO_API, new BigUint64Array([UFFD_API, UFFD_FEATURE_EVENT_REMOVE, 0n]));
      for (const m of maps)
        n.ioctl(
          uffd,
          UFFDIO_REGISTER,
          new BigUint64Array([
            n.bufferAddress(m),
            BigInt(32 * PAGE),
            UFFDIO_REGISTER_MODE_MISSING,
            0n,
          ]),
        );
      assert.equal(n.connect(sockFd, sock), 0);
      const msg = encodeUffdRegions(
        maps.map((m, i) => ({
          baseHostVirtAddr: Number(n.bufferAddress(m)),
          size: 32 * PAGE,
          offset: i * 32 * PAGE,
          pageSize: PAGE,
        })),
      );
      assert.equal(n.sendFds(sockFd, Buffer.from(msg), [uffd]), msg.length);
      // Touching a page blocks this thread until the handler (another process) copies it in.
      const a = new Uint8Array(maps[0]!);
      const b = new Uint8Array(maps[1]!);
      assert.equal(a[5 * PAGE + 100], 6);
      assert.equal(b[3 * PAGE], 36);
      assert.equal(b[31 * PAGE + PAGE - 1], 64);
      b[3 * PAGE] = 0xee; // private: the file is not written
      assert.equal(b[3 * PAGE + 1], 36);
      // Madvised away: the remove event is read by the handler; the next touch is a zero page.
      n.madvise(maps[1]!, 3 * PAGE, PAGE, MADV_DONTNEED);
      assert.equal(b[3 * PAGE], 0);
      assert.equal(b[3 * PAGE + 77], 0);
      assert.equal(a[5 * PAGE], 6, 'still there');
    } finally {
      n.close(sockFd); // the VMM goes away
      const r = await h.done;
      n.close(uffd);
      maps.forEach((m) => n.munmap(m));
      assert.equal(r.code, 0, r.stderr);
      const c = countsOf(r);
      assert.equal(c.copied, 3);
      assert.equal(c.zeroed, 1);
      assert.equal(c.removes, 1);
      assert.ok(c.faults! >= 4, `faults ${c.faults}`);
      assert.ok(!existsSync(sock), 'the handler removes its socket once the VMM connected');
      assert.deepEqual(
        [...readFileSync(memFile).subarray(35 * PAGE, 35 * PAGE + 4)],
        [36, 36, 36, 36],
      );
    }
  });

  test('a hostile handshake ends the handler with one clear line (exit 1), not a crash', async () => {
    const n = native();
    const dir = tempDir();
    const memFile = patternFile(dir, 16);
    const good = (over: object = {}) =>
      JSON.stringify([
        {
          base_host_virt_addr: 0x7f00_0000_0000,
          size: 16 * PAGE,
          offset: 0,
          page_size: PAGE,
          page_size_kib: PAGE,
          ...over,
        },
      ]);
    const cases: Array<[string, string | undefined, 'uffd' | 'eventfd' | 'none', RegExp]> = [
      ['bad JSON', '[{"base_host_virt_addr": 1,', 'uffd', /bad handshake: the message is not JSON/],
      [
        'a region outside the file',
        good({ offset: 8 * PAGE }),
        'uffd',
        /bad handshake: region 0 \(offset 32768, 65536 bytes\) is outside the 65536-byte memory file/,
      ],
      ['a huge size', good({ size: 2 ** 60 }), 'uffd', /below 2\^53/],
      ['no regions', '[]', 'uffd', /lists no memory regions/],
      [
        'a string for a number',
        good({ size: '65536' }),
        'uffd',
        /`size` must be a non-negative integer/,
      ],
      ['page sizes that differ', good({ page_size_kib: 2 * 1024 * 1024 }), 'uffd', /differ/],
      ['no fd', good(), 'none', /without a userfaultfd attached/],
      ['an eventfd', good(), 'eventfd', /not a userfaultfd \(anon_inode:\[eventfd\]\)/],
      ['the VMM hangs up', undefined, 'none', /closed the connection before sending/],
    ];
    for (const [what, text, fd, re] of cases) {
      const sock = join(dir, `${cases.findIndex((c) => c[0] === what)}.sock`);
      const h = startHandler(sock, memFile);
      await h.listening;
      const s = connectTo(sock);
      const attach =
        fd === 'uffd' ? n.userfaultfd(0) : fd === 'eventfd' ? n.eventfd(0, EFD_NONBLOCK) : -1;
      if (text !== undefined) n.sendFds(s, Buffer.from(text), attach >= 0 ? [attach] : []);
      else n.close(s);
      const r = await h.done;
      if (text !== undefined) n.close(s);
      if (attach >= 0) n.close(attach);
      assert.equal(r.code, 1, `${what}: ${r.stdout} ${r.stderr}`);
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, `${what}: ${r.stderr}`);
      assert.match(lines[0]!, /^typervisor uffd-handler: /, what);
      assert.match(lines[0]!, re, what);
    }
    // Bad arguments: exit 2; no VMM connecting within --timeout-ms: exit 1.
    for (const args of [
      ['--socket', join(dir, 'x.sock')],
      [join(dir, 'x.sock')],
      [join(dir, 'x.sock'), memFile, '--socket', join(dir, 'x.sock')],
      ['--bogus'],
    ]) {
      const r = await runCli(['uffd-handler', ...args]);
      assert.equal(r.code, 2, args.join(' '));
      assert.match(r.stderr, /^typervisor uffd-handler: /);
    }
    const lonely = await runCli([
      'uffd-handler',
      '--socket',
      join(dir, 'y.sock'),
      '--mem-file',
      memFile,
      '--timeout-ms',
      '200',
    ]);
    assert.equal(lonely.code, 1);
    assert.match(lonely.stderr, /no VMM connected within 200 ms/);
    assert.ok(!existsSync(join(dir, 'y.sock')));
  });
});

const guests = tinyGuests();
const countGuest = guests.dir ? join(guests.dir, 'count.elf') : undefined;
const skip =
  guests.skip ??
  (countGuest && !existsSync(countGuest) ? 'the tiny guests have no MODE_COUNT' : false);
const T = { timeout: 90_000, skip };

const MEM_MIB = 32;

/** A counting VM snapshotted while paused, then stopped. */
async function snapshotOf(
  dir: string,
): Promise<{ last: number; cut: string; params: LoadParams; mem: string }> {
  const out = join(dir, 'a.out');
  const vm = buildVm(
    validateResources({
      machine: { vcpu_count: 1, mem_size_mib: MEM_MIB },
      boot: { kernel_image_path: guestPath('count') },
      entropy: {},
    }),
    { consoleFd: openSync(out, 'w') },
  );
  await lines(out, 5);
  await vm.vmm.pauseAll(vm.deviceWorker);
  const mem = join(dir, 'mem');
  await createSnapshot(vm, { snapshotPath: join(dir, 'state'), memFilePath: mem, type: 'Full' });
  await stop(vm);
  const text = readFileSync(out, 'latin1');
  const c = countsIn(text);
  return {
    last: c[c.length - 1]!,
    // A pause in the middle of a line: the restored VM prints the rest of it.
    cut: cutLine(text),
    mem,
    params: {
      snapshotPath: join(dir, 'state'),
      memBackend: { type: 'File', path: mem },
      trackDirtyPages: false,
      resumeVm: true,
      clockRealtime: false,
      networkOverrides: [],
    },
  };
}

describe('loading a snapshot with the Uffd backend (KVM, counting tiny guest)', () => {
  test(
    'served by our handler, the count continues exactly; it served some pages, not all; run --restore --mem-uffd too',
    T,
    async (t) => {
      const dir = tempDir();
      const { last, cut, params, mem } = await snapshotOf(dir);
      const sock = join(dir, 'uffd.sock');
      const h = startHandler(sock, mem);
      await h.listening;
      const out = join(dir, 'b.out');
      const t0 = performance.now();
      const vm = await loadSnapshot(
        { ...params, memBackend: { type: 'Uffd', path: sock } },
        { consoleFd: openSync(out, 'w') },
      );
      t.diagnostic(
        `loadSnapshot (Uffd, ${MEM_MIB} MiB) took ${(performance.now() - t0).toFixed(1)} ms`,
      );
      await lines(out, 10);
      const b = counts(out, cut);
      assert.equal(
        b[0],
        last + 1,
        `A ended at ${last} (then ${JSON.stringify(cut)}), B began at ${b[0]}`,
      );
      b.forEach((x, i) => assert.equal(x, b[0]! + i, 'consecutive'));
      await stop(vm);
      const r = await h.done;
      assert.equal(r.code, 0, r.stderr);
      const c = countsOf(r);
      const pages = (MEM_MIB * 1024 * 1024) / PAGE;
      assert.ok(c.copied! > 0 && c.copied! < pages, `copied ${c.copied} of ${pages} pages`);
      assert.ok(c.faults! >= c.copied!);
      t.diagnostic(`handler: ${JSON.stringify(c)} of ${pages} pages`);
      assert.deepEqual(kvmLeftovers(), { vcpuMappings: [], kvmTasks: [] });

      // The CLI: run --restore STATE --mem-uffd SOCK, the count continues from the same place.
      const h2 = startHandler(sock, mem);
      await h2.listening;
      const run = await runCli(['run', '--restore', params.snapshotPath, '--mem-uffd', sock], {
        timeoutMs: 30_000,
        onStdout: (o, child) => {
          if (o.split('\n').length > 10) child.kill('SIGTERM');
        },
      });
      assert.equal(run.timedOut, false, run.stderr);
      const viaCli = countsIn(cut + run.stdout);
      assert.ok(viaCli.length >= 5, run.stdout);
      viaCli.forEach((x, i) => assert.equal(x, last + 1 + i));
      const r2 = await h2.done;
      assert.equal(r2.code, 0, r2.stderr);
      assert.ok(countsOf(r2).copied! > 0);

      // A Uffd-restored VM snapshots again: writing its memory faults every page in through the
      // handler, each exactly once; the new snapshot loads (File) and counts on from there.
      const h3 = startHandler(sock, mem);
      await h3.listening;
      const out3 = join(dir, 'd.out');
      const vm3 = await loadSnapshot(
        { ...params, memBackend: { type: 'Uffd', path: sock } },
        { consoleFd: openSync(out3, 'w') },
      );
      await lines(out3, 3);
      await vm3.vmm.pauseAll(vm3.deviceWorker);
      const t1 = performance.now();
      await createSnapshot(vm3, {
        snapshotPath: join(dir, 'state2'),
        memFilePath: join(dir, 'mem2'),
        type: 'Full',
      });
      t.diagnostic(
        `createSnapshot of a Uffd-restored VM (every page through the handler): ${(performance.now() - t1).toFixed(1)} ms`,
      );
      const lastD = counts(out3).pop()!;
      await stop(vm3);
      const r3 = await h3.done;
      assert.equal(r3.code, 0, r3.stderr);
      assert.equal(countsOf(r3).copied, pages, 'each page copied once');
      const out4 = join(dir, 'e.out');
      const vm4 = await loadSnapshot(
        {
          ...params,
          snapshotPath: join(dir, 'state2'),
          memBackend: { type: 'File', path: join(dir, 'mem2') },
        },
        { consoleFd: openSync(out4, 'w') },
      );
      await lines(out4, 3);
      assert.equal(counts(out4)[0], lastD + 1);
      await stop(vm4);
    },
  );

  test(
    'no handler, a handler that never reads, one that hangs up: refused, nothing left; File works',
    T,
    async (t) => {
      const n = native();
      const dir = tempDir();
      const { last, cut, params } = await snapshotOf(dir);
      const threads = threadCount();
      const fds = () => readdirSync('/proc/self/fd').length;
      const fdsBefore = fds();
      const devnull = openSync('/dev/null', 'w');
      const refused = async (sock: string, re: RegExp, what: string) => {
        await assert.rejects(
          loadSnapshot(
            { ...params, memBackend: { type: 'Uffd', path: sock } },
            { consoleFd: devnull },
          ),
          (e: unknown) => e instanceof SnapshotError && re.test(e.message),
          what,
        );
        // Once the threads have ended: the snapshotted VM's vCPU thread unmaps its kvm_run as it
        // ends, which in the lab's emulation came after the first refusal.
        await eventually(() => {
          const l = kvmLeftovers();
          return l.vcpuMappings.length === 0 && l.kvmTasks.length === 0;
        }, 3000);
        assert.deepEqual(kvmLeftovers(), { vcpuMappings: [], kvmTasks: [] }, what);
        assert.ok(await eventually(() => threadCount() <= threads, 3000), what);
      };
      await refused(
        join(dir, 'nobody.sock'),
        /^Load snapshot error: Uffd memory backend: cannot connect to the page-fault handler at .*nobody\.sock \(ENOENT\)/,
        'no socket',
      );
      // Listening, never accepting: the message is never taken (5 s).
      const deaf = join(dir, 'deaf.sock');
      const deafFd = n.unixSocket();
      n.bindListen(deafFd, deaf, 4);
      await refused(deaf, /did not take the memory regions within 5000 ms/, 'never reads');
      // Accepts and hangs up at once.
      const rude = join(dir, 'rude.sock');
      const rudeFd = n.unixSocket();
      n.bindListen(rudeFd, rude, 4);
      const hangUp = setInterval(() => {
        const c = n.accept(rudeFd);
        if (c >= 0) n.close(c);
      }, 1);
      await refused(rude, /closed the connection/, 'hangs up');
      clearInterval(hangUp);
      n.close(deafFd);
      n.close(rudeFd);
      assert.equal(fds(), fdsBefore + 1 /* devnull */, 'an fd was left open');

      const out = join(dir, 'c.out');
      const t0 = performance.now();
      const vm = await loadSnapshot(params, { consoleFd: openSync(out, 'w') });
      t.diagnostic(
        `loadSnapshot (File, ${MEM_MIB} MiB) took ${(performance.now() - t0).toFixed(1)} ms`,
      );
      await lines(out, 3);
      assert.equal(counts(out, cut)[0], last + 1);
      await stop(vm);
    },
  );

  test(
    'through the API: 400 and still "Not started" with no handler; then Uffd with ours',
    T,
    async () => {
      const dir = tempDir();
      const { last, cut, mem } = await snapshotOf(dir);
      const s = await startServer();
      try {
        const load = (path: string) =>
          call(s.sock, 'PUT', '/snapshot/load', {
            snapshot_path: join(dir, 'state'),
            mem_backend: { backend_type: 'Uffd', backend_path: path },
            resume_vm: true,
          });
        let r = await load(join(dir, 'nobody.sock'));
        assert.equal(r.status, 400, r.body);
        assert.match(r.json.fault_message, /Uffd memory backend: cannot connect/);
        assert.equal((await call(s.sock, 'GET', '/')).json.state, 'Not started');
        const sock = join(dir, 'uffd.sock');
        const h = startHandler(sock, mem);
        await h.listening;
        r = await load(sock);
        assert.equal(r.status, 204, r.body);
        const hex = () => countsIn(cut + s.stdout());
        assert.ok(await eventually(() => hex().length >= 3, 20_000), 'the loaded VM counts');
        assert.equal(hex()[0], last + 1);
        await s.kill();
        const done = await h.done;
        assert.equal(done.code, 0, done.stderr);
        assert.ok(countsOf(done).copied! > 0);
      } finally {
        await s.kill();
      }
      assert.ok(statSync(mem).size === MEM_MIB * 1024 * 1024);
    },
  );

  test(
    '--config-file with "snapshot-load" restores instead of booting (Uffd), with the API rules',
    T,
    async () => {
      const dir = tempDir();
      const { last, cut, mem } = await snapshotOf(dir);
      const sock = join(dir, 'uffd.sock');
      const section = (backendPath: string, extra: object = {}) => ({
        'snapshot-load': {
          snapshot_path: join(dir, 'state'),
          mem_backend: { backend_type: 'Uffd', backend_path: backendPath },
          resume_vm: true,
        },
        ...extra,
      });
      const cfgFile = (name: string, c: object) => {
        const p = join(dir, name);
        writeFileSync(p, JSON.stringify(c));
        return p;
      };
      // Refused with one line and exit 152: another section beside it, no handler listening.
      for (const [name, c, re] of [
        [
          'with-boot.json',
          section(sock, { 'boot-source': { kernel_image_path: guestPath('count') } }),
          /configuration section "boot-source" cannot be used with "snapshot-load"/,
        ],
        [
          'no-handler.json',
          section(join(dir, 'nobody.sock')),
          /Uffd memory backend: cannot connect/,
        ],
        [
          'paused-no-api.json',
          { 'snapshot-load': { snapshot_path: 's', mem_file_path: 'm' } },
          /nothing can resume it/,
        ],
      ] as const) {
        const r = await runCli(['--no-api', '--config-file', cfgFile(name, c)]);
        assert.equal(r.code, 152, `${name}: ${r.stderr}`);
        // One line in Firecracker's log format ([instance:thread] message), then the exit line.
        assert.match(r.stderr, /\] bad configuration file /, name);
        assert.match(r.stderr, re, name);
      }
      const h = startHandler(sock, mem);
      await h.listening;
      const s = await startServer(['--config-file', cfgFile('good.json', section(sock))]);
      try {
        assert.equal((await call(s.sock, 'GET', '/')).json.state, 'Running');
        const hex = () => countsIn(cut + s.stdout());
        assert.ok(await eventually(() => hex().length >= 3, 20_000), 'the restored VM counts');
        assert.equal(hex()[0], last + 1);
        hex().forEach((x, i) => assert.equal(x, last + 1 + i));
      } finally {
        await s.kill();
      }
      const done = await h.done;
      assert.equal(done.code, 0, done.stderr);
    },
  );
});
