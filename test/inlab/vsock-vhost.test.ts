/**
 * virtio-vsock's vhost backend (`--vsock cid=N,backend=vhost`) with Debian's cloud kernel and
 * the Debian root disk, inside the lab: the lab kernel's vhost-vsock serves the data queues and
 * host programs use AF_VSOCK (socat's VSOCK-LISTEN / VSOCK-CONNECT at both ends). Checked: a
 * transfer each way with matching SHA-256; a pause in the middle of a transfer (the kernel is
 * stopped and started again) loses nothing; a second VM asking for the same CID is refused
 * before boot with a clear error; GET /vm/config reads the backend back; a snapshot loaded by a
 * new process (the first one killed) moves data both ways again, and powers off cleanly.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { imagePaths, repoRoot } from '../../src/lab/guest.js';
import { curl, defaultGuest, skipReason } from './helpers.js';
import { GuestSession } from './session.js';

const MIB = Number(process.env.TYPERVISOR_VSOCK_TEST_MIB ?? 16);
const CID = 41;
const opts = { skip: skipReason, timeout: 900_000 };
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** A host socat; resolves with its exit status (and stderr, for failures). */
function socat(args: string[]): {
  child: ChildProcess;
  done: Promise<{ code: number | null; err: string }>;
} {
  const child = spawn('socat', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const done = new Promise<{ code: number | null; err: string }>((resolve) =>
    child.on('exit', (code) => resolve({ code, err })),
  );
  return { child, done };
}

test(
  'virtio-vsock vhost backend: both ways over AF_VSOCK, a pause mid-transfer, a CID in use, a snapshot loaded by a new process',
  opts,
  async () => {
    spawnSync('modprobe', ['vhost_vsock']);
    assert.ok(
      existsSync('/dev/vhost-vsock'),
      'the lab kernel has vhost-vsock (modprobe vhost_vsock)',
    );
    const g = defaultGuest();
    const src = imagePaths('rootfs').ROOTFS!;
    if (!existsSync(src))
      throw new Error('the Debian root disk is not built: npm run guest -- build rootfs');
    const dir = mkdtempSync(join(tmpdir(), 'tv-vhost-'));
    const sockDir = mkdtempSync(join(existsSync('/run') ? '/run' : tmpdir(), 'tv-vhost-'));
    const root = join(dir, 'rootfs.ext4');
    assert.equal(spawnSync('cp', ['--sparse=always', src, root]).status, 0);
    const payload = randomBytes(MIB * 1024 * 1024);
    const dataFile = join(dir, 'data.img');
    writeFileSync(dataFile, payload);
    const api = join(sockDir, 'api.sock');
    const timings: string[] = [];
    let vm: GuestSession | undefined;
    const hostSide: ChildProcess[] = [];
    try {
      // Firecracker-style (a config file and the API socket), for PATCH /vm mid-transfer.
      const cfg = join(dir, 'vm.json');
      writeFileSync(
        cfg,
        JSON.stringify({
          'boot-source': {
            kernel_image_path: g.kernel,
            initrd_path: g.initrd,
            boot_args: 'console=ttyS0 reboot=k panic=1 pci=off',
          },
          'machine-config': { vcpu_count: 1, mem_size_mib: 768 },
          drives: [
            { drive_id: 'rootfs', path_on_host: root, is_root_device: true, is_read_only: false },
            { drive_id: 'data', path_on_host: dataFile, is_root_device: false, is_read_only: true },
          ],
          vsock: { guest_cid: CID, backend: 'vhost' },
        }),
      );
      vm = new GuestSession(['--api-sock', api, '--config-file', cfg]);
      await vm.waitFor(/TYPERVISOR-BOOT-OK/, 300_000);
      timings.push(`booted in ${Date.now() - vm.t0} ms`);

      // A second VM with the same CID: refused before boot (the kernel has the CID taken).
      const second = spawnSync(
        process.execPath,
        [
          join(repoRoot(), 'bin', 'typervisor'),
          'run',
          '--kernel',
          g.kernel,
          '--initrd',
          g.initrd,
          '--vsock',
          `cid=${CID},backend=vhost`,
        ],
        { encoding: 'utf8', input: '', timeout: 120_000 },
      );
      assert.equal(second.status, 2, second.stderr);
      assert.match(second.stderr, new RegExp(`guest_cid ${CID} is in use`));

      // Guest -> host: the guest sends the read-only drive; the host stores what arrives.
      const out = join(dir, 'g2h.bin');
      const listen = socat(['-u', 'VSOCK-LISTEN:5000', `OPEN:${out},creat,trunc`]);
      hostSide.push(listen.child);
      await new Promise((r) => setTimeout(r, 1000));
      let t = Date.now();
      vm.send('socat -u - VSOCK-CONNECT:2:5000 < /dev/vdb; echo "G2H-DONE $?"\n');
      await vm.waitFor(/G2H-DONE 0/, 300_000);
      const l = await listen.done;
      assert.equal(l.code, 0, l.err);
      timings.push(`guest -> host ${MIB} MiB: ${Date.now() - t} ms`);
      assert.equal(sha(readFileSync(out)), sha(payload), 'guest -> host data');

      // Host -> guest, with the VM paused and resumed in the middle (PATCH /vm): the kernel stops
      // and starts again; the guest must still get every byte.
      vm.send(
        'socat -u VSOCK-LISTEN:6000 - | sha256sum | sed "s/^/H2G /" & sleep 2; echo "LISTEN""-READY"\n',
      );
      await vm.waitFor(/LISTEN-READY/, 60_000);
      t = Date.now();
      const send = socat(['-u', `OPEN:${dataFile}`, `VSOCK-CONNECT:${CID}:6000`]);
      hostSide.push(send.child);
      await new Promise((r) => setTimeout(r, 1500));
      const paused = curl(api, 'PATCH', '/vm', { state: 'Paused' });
      assert.equal(paused.status, 204, paused.body);
      await new Promise((r) => setTimeout(r, 1000));
      const resumed = curl(api, 'PATCH', '/vm', { state: 'Resumed' });
      assert.equal(resumed.status, 204, resumed.body);
      const s = await send.done;
      assert.equal(s.code, 0, s.err);
      const [, got] = (await vm.waitFor(/H2G ([0-9a-f]{64})/, 300_000)) as RegExpMatchArray;
      timings.push(`host -> guest ${MIB} MiB with a pause: ${Date.now() - t} ms`);
      assert.equal(got, sha(payload), 'host -> guest data');

      // GET /vm/config gives the backend back (and no uds_path).
      const c = curl(api, 'GET', '/vm/config');
      assert.equal(c.status, 200, c.body);
      assert.deepEqual(JSON.parse(c.body).vsock, { guest_cid: CID, backend: 'vhost' });

      // A snapshot, the VMM killed, the snapshot loaded by a new process: the kernel's rings go
      // on from the saved positions (another transfer each way), the CID is free again once the
      // old process is gone.
      vm.send('echo "QUIET""-NOW"\n');
      await vm.waitFor(/QUIET-NOW/, 30_000);
      t = Date.now();
      const snap = join(dir, 'vm.snap');
      const memFile = join(dir, 'vm.mem');
      for (const [method, path, body] of [
        ['PATCH', '/vm', { state: 'Paused' }],
        [
          'PUT',
          '/snapshot/create',
          { snapshot_type: 'Full', snapshot_path: snap, mem_file_path: memFile },
        ],
      ] as const) {
        const r = curl(api, method, path, body);
        assert.equal(r.status, 204, `${method} ${path}: ${r.body}`);
      }
      vm.kill();
      await vm.exited;
      const api2 = join(sockDir, 'api2.sock');
      vm = new GuestSession(['--api-sock', api2]);
      for (const end = Date.now() + 30_000; ;) {
        try {
          if (curl(api2, 'GET', '/').status === 200) break;
        } catch {
          // not listening yet
        }
        if (Date.now() > end) throw new Error('no API socket after 30 s');
        await new Promise((r) => setTimeout(r, 100));
      }
      const load = curl(api2, 'PUT', '/snapshot/load', {
        snapshot_path: snap,
        mem_backend: { backend_type: 'File', backend_path: memFile },
        resume_vm: true,
      });
      assert.equal(load.status, 204, load.body);
      timings.push(`snapshot, kill, load: ${Date.now() - t} ms`);
      const out2 = join(dir, 'g2h-2.bin');
      const listen2 = socat(['-u', 'VSOCK-LISTEN:5001', `OPEN:${out2},creat,trunc`]);
      hostSide.push(listen2.child);
      await new Promise((r) => setTimeout(r, 1000));
      t = Date.now();
      vm.send('socat -u - VSOCK-CONNECT:2:5001 < /dev/vdb; echo "G2H2-DONE $?"\n');
      await vm.waitFor(/G2H2-DONE 0/, 300_000);
      const l2 = await listen2.done;
      assert.equal(l2.code, 0, l2.err);
      assert.equal(sha(readFileSync(out2)), sha(payload), 'guest -> host data after the load');
      timings.push(`guest -> host after the load: ${Date.now() - t} ms`);
      vm.send(
        'socat -u VSOCK-LISTEN:6001 - | sha256sum | sed "s/^/H2G2 /" & sleep 2; echo "LISTEN2""-READY"\n',
      );
      await vm.waitFor(/LISTEN2-READY/, 60_000);
      const send2 = socat(['-u', `OPEN:${dataFile}`, `VSOCK-CONNECT:${CID}:6001`]);
      hostSide.push(send2.child);
      const s2 = await send2.done;
      assert.equal(s2.code, 0, s2.err);
      const [, got2] = (await vm.waitFor(/H2G2 ([0-9a-f]{64})/, 300_000)) as RegExpMatchArray;
      assert.equal(got2, sha(payload), 'host -> guest data after the load');

      vm.send('poweroff -f\n');
      assert.equal(await vm.exited, 0, vm.describe());
      console.log(`# ${timings.join('; ')}`);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n${timings.join('; ')}\n${vm?.describe()}`);
    } finally {
      vm?.kill();
      for (const c of hostSide) c.kill();
      rmSync(dir, { recursive: true, force: true });
      rmSync(sockDir, { recursive: true, force: true });
    }
  },
);
