/**
 * Needs /dev/kvm, gcc and ld, and the counting tiny guest (MODE_COUNT). createSnapshot and
 * loadSnapshot in THIS process, on the paths the API's file checks do not reach: a restore that
 * KVM or the device worker refuses half-way (bad vCPU state, bad device state) leaves no fd,
 * mapping or thread and a correct load still works; a load that is not resumed stays paused and
 * the count continues exactly once resumed; a restored VM snapshots again (not onto its own
 * memory file). The two-process flow through the API and the CLI is test/host/snapshot.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, openSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { buildVm } from '../../src/vmm/builder.js';
import { validateResources } from '../../src/vmm/resources.js';
import { encodeSnapshotFile, readSnapshotFile } from '../../src/vmm/snapshot-format.js';
import {
  createSnapshot,
  loadSnapshot,
  SnapshotError,
  type LoadParams,
} from '../../src/vmm/snapshot.js';
import {
  eventually,
  guestPath,
  kvmLeftovers,
  tempDir,
  threadCount,
  tinyGuests,
} from './helpers.js';
import { counts, countsIn, cutLine, lines, stop } from './counting-guest.js';

const guests = tinyGuests();
const countGuest = guests.dir ? join(guests.dir, 'count.elf') : undefined;
const skip =
  guests.skip ??
  (countGuest && !existsSync(countGuest) ? 'the tiny guests have no MODE_COUNT' : false);
const T = { timeout: 60_000, skip };

function fds(): string[] {
  return readdirSync('/proc/self/fd');
}

/** A counting VM with an entropy device, snapshotted while paused; it is stopped after. */
async function snapshotOf(dir: string): Promise<{ last: number; cut: string; params: LoadParams }> {
  const out = join(dir, 'a.out');
  const vm = buildVm(
    validateResources({
      machine: { vcpu_count: 1, mem_size_mib: 32 },
      boot: { kernel_image_path: guestPath('count') },
      entropy: {},
    }),
    { consoleFd: openSync(out, 'w') },
  );
  await lines(out, 5);
  await vm.vmm.pauseAll(vm.deviceWorker);
  await createSnapshot(vm, {
    snapshotPath: join(dir, 'state'),
    memFilePath: join(dir, 'mem'),
    type: 'Full',
  });
  await stop(vm);
  const text = readFileSync(out, 'latin1');
  const c = countsIn(text);
  assert.equal(statSync(join(dir, 'mem')).size, 32 * 1024 * 1024);
  return {
    last: c[c.length - 1]!,
    cut: cutLine(text),
    params: {
      snapshotPath: join(dir, 'state'),
      memBackend: { type: 'File', path: join(dir, 'mem') },
      trackDirtyPages: false,
      resumeVm: false,
      clockRealtime: false,
      networkOverrides: [],
    },
  };
}

test(
  'a restore refused by KVM or by the device worker leaves nothing; a correct load then works',
  T,
  async () => {
    const dir = tempDir();
    const { last, cut, params } = await snapshotOf(dir);
    const saved = readSnapshotFile(params.snapshotPath);
    assert.ok(saved.ok);
    const devnull = openSync('/dev/null', 'w');
    const threads = threadCount();
    const fdsBefore = fds().length;

    const badVcpu = structuredClone(saved.value);
    badVcpu.vcpus[0]!.sregs = new Uint8Array(badVcpu.vcpus[0]!.sregs.length).fill(0xff);
    writeFileSync(join(dir, 'bad-vcpu'), encodeSnapshotFile(badVcpu));
    const badDevice = structuredClone(saved.value);
    badDevice.devices[0]!.state = new Uint8Array(16).fill(7);
    writeFileSync(join(dir, 'bad-device'), encodeSnapshotFile(badDevice));

    for (const [file, re] of [
      ['bad-vcpu', /^cannot restore vCPU 0: /],
      ['bad-device', /^cannot restore the virtio devices: rng device "entropy"/],
    ] as const) {
      await assert.rejects(
        loadSnapshot(
          { ...params, snapshotPath: join(dir, file), resumeVm: true },
          { consoleFd: devnull },
        ),
        (e: unknown) => e instanceof SnapshotError && re.test(e.reason),
      );
      assert.deepEqual(kvmLeftovers(), { vcpuMappings: [], kvmTasks: [] }, file);
      assert.ok(
        await eventually(() => threadCount() <= threads, 3000),
        `${file}: threads ${threadCount()}, ${threads} before`,
      );
      assert.equal(fds().length, fdsBefore, `${file}: an fd was left open`);
    }

    // Not resumed: paused, and the guest prints nothing until resumed; then the count goes on.
    const out = join(dir, 'b.out');
    const vm = await loadSnapshot(params, { consoleFd: openSync(out, 'w') });
    assert.equal(vm.vmm.state, 'paused');
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(readFileSync(out, 'utf8'), '', 'the guest ran while paused');
    await vm.vmm.resumeAll(vm.deviceWorker);
    await lines(out, 3);
    // A's cut line and B's first make one (counts() leaves out a line that is not whole).
    const b = counts(out, cut);
    assert.equal(
      b[0],
      last + 1,
      `A ended at ${last} (then ${JSON.stringify(cut)}), B began at ${b[0]}`,
    );
    b.forEach((x, i) => assert.equal(x, b[0]! + i, 'consecutive'));
    await stop(vm);
    assert.deepEqual(kvmLeftovers(), { vcpuMappings: [], kvmTasks: [] });
  },
);

test('a restored VM snapshots again, but not onto the memory file it runs from', T, async () => {
  const dir = tempDir();
  const { params } = await snapshotOf(dir);
  const out = join(dir, 'b.out');
  const vm = await loadSnapshot({ ...params, resumeVm: true }, { consoleFd: openSync(out, 'w') });
  await lines(out, 3);
  await vm.vmm.pauseAll(vm.deviceWorker);
  const memBefore = readFileSync(join(dir, 'mem'));
  await assert.rejects(
    createSnapshot(vm, {
      snapshotPath: join(dir, 'state2'),
      memFilePath: join(dir, 'mem'),
      type: 'Full',
    }),
    /the memory file this microVM was restored from/,
  );
  assert.ok(memBefore.equals(readFileSync(join(dir, 'mem'))), 'the backing file changed');
  assert.ok(!existsSync(join(dir, 'state2')), 'a refused create wrote the state file');
  await createSnapshot(vm, {
    snapshotPath: join(dir, 'state2'),
    memFilePath: join(dir, 'mem2'),
    type: 'Full',
  });
  const text = readFileSync(out, 'latin1');
  const c = countsIn(text);
  await stop(vm);

  const out2 = join(dir, 'c.out');
  const vm2 = await loadSnapshot(
    {
      ...params,
      snapshotPath: join(dir, 'state2'),
      memBackend: { type: 'File', path: join(dir, 'mem2') },
      resumeVm: true,
    },
    { consoleFd: openSync(out2, 'w') },
  );
  await lines(out2, 2);
  assert.equal(counts(out2, cutLine(text))[0], c[c.length - 1]! + 1);
  await stop(vm2);
});
