/**
 * Needs /dev/kvm, gcc and ld, root and /dev/net/tun. Typervisor's virtio-net under an
 * independent driver, on a real TAP: the micro benchmark's net-loop guest
 * (bench/guests/netloop.S, a polled virtio-mmio version 2 driver in assembly) sends ICMP echo
 * requests to the host one at a time and checks that an echo reply comes back for each. The TAP
 * lives in a network namespace of the test's own (made here, removed after), as
 * bench/net-micro.ts sets it up. It prints "D" when every round trip came back, "E<reason>"
 * otherwise.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { CLI, REPO, benchGuestSkipReason, tempDir } from './helpers.js';
import {
  NETLOOP_GUEST_MAC,
  netMicroSkipReason,
  setUpNetloopNamespace,
} from '../../bench/net-micro.js';

const NS = `tvnltest${process.pid}`;
const TAP = 'tvnlt0';

function skipReason(): string | undefined {
  const s = benchGuestSkipReason();
  if (s) return s;
  return netMicroSkipReason();
}

const skip = skipReason();
const T = { skip: skip ?? false, timeout: 60_000 };
let dir = '';
if (!skip) {
  dir = tempDir('typervisor-netloop-');
  const r = spawnSync('sh', [join(REPO, 'bench', 'guests', 'build.sh'), dir], {
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(`bench/guests/build.sh failed (${r.status}): ${r.stderr}`);
  setUpNetloopNamespace(NS, TAP);
}
after(() => {
  if (!skip) spawnSync('ip', ['netns', 'delete', NS]);
});

/** `typervisor run` of the net-loop guest in the namespace; its stdout, stderr and exit code. */
function runInNs(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const c = spawn('ip', ['netns', 'exec', NS, CLI, 'run', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
    c.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    const timer = setTimeout(() => c.kill('SIGKILL'), 45_000);
    c.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

const guest = () => join(dir, 'netloop-small.elf');

test('700 ICMP echo round trips with the host over virtio-net and a TAP, polled', T, async (t) => {
  const r = await runInNs([
    ...['--kernel', guest(), '--memory', '64'],
    ...['--net', `tap=${TAP},mac=${NETLOOP_GUEST_MAC}`],
  ]);
  t.diagnostic(`exit ${r.code}, stdout ${JSON.stringify(r.stdout)}`);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, 'M\nS\nD\n', r.stderr);
});

test('no virtio-net device: the guest finds none ("En")', T, async () => {
  const r = await runInNs(['--kernel', guest(), '--memory', '64']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, 'M\nEn\n', r.stderr);
});
