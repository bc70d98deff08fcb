/**
 * Needs /dev/kvm, gcc and ld. Boots the tiny guests (test/guests/tiny.S) with the real CLI in
 * a child process and checks what the user sees: exit code, console output, stderr lines.
 * Each run has a hard timeout (SIGKILL) and must leave no process behind.
 */
import { after, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import {
  CLI,
  REPO,
  childPids,
  guestPath,
  processGone,
  runCli,
  tinyGuests,
  type CliOptions,
  type CliResult,
} from './helpers.js';

const guests = tinyGuests();
const hasScript = () => spawnSync('script', ['--version'], { stdio: 'ignore' }).status === 0;
const skip = guests.skip ?? false;
const T = { timeout: 30_000, skip };

/** Runs the CLI on a tiny guest and checks the child is gone afterwards. */
async function boot(
  t: TestContext,
  guest: string,
  extra: string[] = [],
  opts: CliOptions = {},
): Promise<CliResult> {
  const r = await runCli(['run', '--kernel', guestPath(guest), '--memory', '32', ...extra], {
    timeoutMs: 15_000,
    ...opts,
  });
  t.diagnostic(`${guest} ${extra.join(' ')}: exit ${r.code} in ${r.ms.toFixed(0)} ms`);
  assert.equal(
    r.timedOut,
    false,
    `the CLI did not exit within the timeout; stdout=${JSON.stringify(r.stdout)} stderr=${JSON.stringify(r.stderr)}`,
  );
  assert.ok(processGone(r.pid), `child ${r.pid} is still there (zombie?)`);
  return r;
}

describe('typervisor run with tiny guests (KVM)', () => {
  after(() => assert.deepEqual(childPids(), [], 'child processes left behind'));

  test('port I/O and the UART: the poweroff guest prints and exits 0', T, async (t) => {
    const r = await boot(t, 'poweroff');
    assert.equal(r.stdout, 'tiny guest up\n');
    assert.equal(r.stderr, '');
    assert.equal(r.code, 0);
  });

  test('ACPI poweroff is reported at info level', T, async (t) => {
    const r = await boot(t, 'poweroff', ['--log-level', 'info']);
    assert.equal(r.code, 0);
    assert.match(r.stderr, /^typervisor: guest powered off$/m);
  });

  test('two vCPUs: the BSP powers off while the AP waits for SIPI', T, async (t) => {
    const r = await boot(t, 'poweroff', ['--vcpus', '2']);
    assert.equal(r.stdout, 'tiny guest up\n');
    assert.equal(r.code, 0);
  });

  test(
    'on a terminal (stdin, stdout and stderr a pty, as in a shell): the guest prints and exits 0 with the filters on',
    { ...T, skip: skip || (hasScript() ? false : 'script(1) (bsdutils) is not installed') },
    (t) => {
      // script(1) gives the CLI a pseudo-terminal for all three: Node then reopens the tty and
      // dup3s it over the descriptor (libuv), which the main thread's filter once killed.
      const cmd = [
        process.execPath,
        CLI,
        'run',
        '--kernel',
        guestPath('poweroff'),
        '--memory',
        '32',
      ]
        .map((a) => `'${a.replaceAll("'", "'\\''")}'`)
        .join(' ');
      const r = spawnSync('script', ['-qec', `${cmd}; echo "exit=$?"`, '/dev/null'], {
        cwd: REPO,
        encoding: 'utf8',
        timeout: 15_000,
        env: { ...process.env, TYPERVISOR_LOG: undefined, TYPERVISOR_LOG_FORMAT: undefined },
      });
      t.diagnostic(`on a pty: ${JSON.stringify(r.stdout)}`);
      assert.equal(r.error, undefined, String(r.error));
      assert.match(r.stdout, /tiny guest up/);
      assert.match(r.stdout, /exit=0\s*$/, `not exit 0 on a terminal: ${JSON.stringify(r.stdout)}`);
    },
  );

  test('--boot-timer reports the boot marker port write', T, async (t) => {
    const r = await boot(t, 'poweroff', ['--boot-timer']);
    assert.equal(r.code, 0);
    const m = /^typervisor: boot marker at ([\d.]+) ms after process start$/m.exec(r.stderr);
    assert.ok(m, `no boot marker line in ${JSON.stringify(r.stderr)}`);
    assert.ok(Number(m[1]) > 0 && Number(m[1]) < r.ms + 1000);
  });

  test(
    'MMIO exits: an unclaimed read answers all-ones, logged once at info level',
    T,
    async (t) => {
      const quiet = await boot(t, 'mmio');
      assert.equal(quiet.code, 0);
      assert.equal(
        quiet.stdout,
        'tiny guest up\nF',
        "the guest prints 'F' when its read returned 0xffffffff",
      );
      assert.equal(quiet.stderr, '', 'nothing on stderr at the default level');

      const loud = await boot(t, 'mmio', ['--log-level', 'info']);
      assert.equal(loud.code, 0);
      assert.equal(loud.stdout, 'tiny guest up\nF');
      const unhandled = loud.stderr.split('\n').filter((l) => l.includes('unhandled'));
      // The guest writes, then reads, 0xd0000000: one address, one line.
      assert.equal(unhandled.length, 1, loud.stderr);
      assert.match(unhandled[0]!, /^typervisor: unhandled mmio \w+ of 4 bytes at 0xd0000000/);
    },
  );

  test(
    'a triple fault on the BSP of two vCPUs: its reason wins over the stopped AP',
    T,
    async (t) => {
      const r = await boot(t, 'triple', ['--vcpus', '2']);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /^typervisor: .*triple.fault[^\n]*\n$/i);
    },
  );

  test('i8042 reset (0xfe to port 0x64): exit 0, "rebooted" at info level', T, async (t) => {
    const r = await boot(t, 'reset', ['--log-level', 'info']);
    assert.equal(r.code, 0);
    assert.equal(r.stdout, 'tiny guest up\n');
    assert.match(r.stderr, /^typervisor: guest rebooted$/m);
  });

  test('a triple fault: exit 1 with one line naming it', T, async (t) => {
    const r = await boot(t, 'triple');
    assert.equal(r.code, 1);
    assert.equal(r.stdout, 'tiny guest up\n');
    const lines = r.stderr.split('\n').filter(Boolean);
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0]!, /^typervisor: .*triple.fault/i);
  });

  test('the i8042 answers status, command byte and self-test through port I/O', T, async (t) => {
    const r = await boot(t, 'i8042');
    assert.equal(r.code, 0);
    const m = /^kbd ([0-9a-f]{2}) ([0-9a-f]{2}) ([0-9a-f]{2})$/m.exec(r.stdout);
    assert.ok(m, r.stdout);
    const [status, ctr, selfTest] = [m[1], m[2], m[3]].map((x) => parseInt(x!, 16)) as [
      number,
      number,
      number,
    ];
    assert.equal(status & 0x01, 0, 'no output byte pending at power-on');
    assert.equal(status & 0x04, 0x04, 'system flag set');
    assert.equal(ctr & 0x01, 0x01, 'keyboard interrupt enabled in the command byte');
    assert.equal(selfTest, 0x55, 'controller self-test passes');
  });

  test('the CMOS RTC gives the host UTC time in BCD, 24-hour', T, async (t) => {
    const before = Date.now();
    const r = await boot(t, 'rtc');
    const after_ = Date.now();
    assert.equal(r.code, 0);
    const m = /^rtc (\w\w) (\w\w) (\w\w)-(\w\w)-(\w\w) (\w\w):(\w\w):(\w\w)$/m.exec(r.stdout);
    assert.ok(m, r.stdout);
    const [b, century, yy, mo, dd, hh, mi, ss] = m.slice(1).map((x) => x!);
    assert.equal(parseInt(b!, 16) & 0x06, 0x02, 'register B: BCD (DM=0), 24-hour');
    // BCD: the hex digits read as decimal.
    const n = (x: string) => {
      assert.match(x, /^\d\d$/, `not BCD: ${x}`);
      return Number(x);
    };
    const guest = Date.UTC(n(century!) * 100 + n(yy!), n(mo!) - 1, n(dd!), n(hh!), n(mi!), n(ss!));
    assert.ok(
      guest >= before - 2000 && guest <= after_ + 1000,
      `guest time ${new Date(guest).toISOString()} vs host ${new Date(before).toISOString()}`,
    );
  });

  test('console input: the echo guest gets "hello\\n" from stdin and echoes it', T, async (t) => {
    const r = await boot(t, 'echo', [], { input: 'hello\n' });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'tiny guest up\nhello\n');
  });

  test(
    'console input larger than the UART ring (4 KiB) arrives whole and in order',
    { ...T, timeout: 90_000 },
    async (t) => {
      let text = '';
      for (let i = 0; text.length < 10_000; i++) text += `line ${i} `;
      // ~30,000 port exits (three per byte echoed): 17-24 s under the lab's emulated KVM.
      const r = await boot(t, 'echo', [], { input: text + '\n', timeoutMs: 60_000 });
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout, 'tiny guest up\n' + text + '\n');
    },
  );

  test(
    'stdin left open (a pipe nobody closes) does not keep the CLI alive after poweroff',
    T,
    async (t) => {
      const r = await boot(t, 'poweroff', [], { holdStdin: true });
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout, 'tiny guest up\n');
    },
  );

  test(
    'input the guest never reads (receiver off) is held, and does not block poweroff',
    T,
    async (t) => {
      const r = await boot(t, 'poweroff', [], { input: 'nobody reads this\n' });
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout, 'tiny guest up\n');
    },
  );

  for (const sig of ['SIGTERM', 'SIGINT'] as const) {
    test(`${sig} stops a spinning guest: exit 0, nothing left running`, T, async (t) => {
      let sent = false;
      const r = await boot(t, 'spin', [], {
        holdStdin: true,
        onStdout: (out, child) => {
          if (!sent && out.includes('tiny guest up\n')) {
            sent = true;
            child.kill(sig);
          }
        },
      });
      assert.ok(sent, 'the guest never came up');
      assert.equal(r.signal, null, `killed by ${r.signal}, not a clean exit`);
      assert.equal(r.code, 0, r.stderr);
      assert.ok(r.ms < 10_000);
    });
  }

  test(
    'four vCPUs (the BSP spins, three APs wait for SIPI): SIGTERM stops them all',
    T,
    async (t) => {
      let sent = false;
      const r = await boot(t, 'spin', ['--vcpus', '4'], {
        onStdout: (out, child) => {
          if (!sent && out.includes('tiny guest up\n')) {
            sent = true;
            child.kill('SIGTERM');
          }
        },
      });
      assert.ok(sent);
      assert.equal(r.code, 0, r.stderr);
    },
  );
});
