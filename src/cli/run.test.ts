import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, HostError, ImageError } from '../util/errors.js';
import { setLogLevel } from '../util/log.js';
import { DEFAULT_BOOT_ARGS, validateMachineConfig, validateResources } from '../vmm/index.js';
import {
  EXIT_GUEST_FAILED,
  EXIT_HOST,
  EXIT_USAGE,
  exitCodeFor,
  isRestore,
  parseRestoreArgs,
  parseRunArgs,
  RUN_USAGE,
} from './run.js';

const T = { timeout: 5000 };
const dir = mkdtempSync(join(tmpdir(), 'run-args-'));
const kernel = join(dir, 'kernel');
writeFileSync(kernel, 'x');

after(() => {
  rmSync(dir, { recursive: true, force: true });
  setLogLevel('warn');
});

async function configError(argv: string[], message: RegExp): Promise<void> {
  await assert.rejects(parseRunArgs(argv), (e: unknown) => {
    assert.ok(e instanceof ConfigError, `not a ConfigError: ${String(e)}`);
    assert.match(e.message, message);
    assert.doesNotMatch(e.message, /\n/, 'one line');
    return true;
  });
}

describe('parseRunArgs', () => {
  test('defaults: 1 vCPU, 256 MiB, the default command line, no initrd, flags off', T, async () => {
    const { res, bootTimer, allowPvm } = await parseRunArgs(['--kernel', kernel]);
    assert.deepEqual(res, {
      machine: { vcpu_count: 1, mem_size_mib: 256 },
      boot: { kernel_image_path: kernel, initrd_path: undefined, boot_args: DEFAULT_BOOT_ARGS },
    });
    assert.equal(bootTimer, false);
    assert.equal(allowPvm, false);
  });

  test('every option is carried into VmResources in Firecracker field names', T, async () => {
    const { res, bootTimer, allowPvm } = await parseRunArgs([
      '--kernel',
      kernel,
      '--initrd',
      '/x/initrd',
      '--cmdline',
      'console=ttyS0 quiet',
      '--vcpus',
      '4',
      '--memory',
      '512',
      '--boot-timer',
      '--allow-pvm',
      '--log-level',
      'debug',
      '--track-dirty-pages',
    ]);
    assert.deepEqual(res, {
      machine: { vcpu_count: 4, mem_size_mib: 512, track_dirty_pages: true },
      boot: {
        kernel_image_path: kernel,
        initrd_path: '/x/initrd',
        boot_args: 'console=ttyS0 quiet',
      },
    });
    assert.equal(bootTimer, true);
    assert.equal(allowPvm, true);
  });

  test('--opt=value form and an empty --cmdline', T, async () => {
    const { res } = await parseRunArgs([
      `--kernel=${kernel}`,
      '--vcpus=2',
      '--memory=64',
      '--cmdline=',
    ]);
    assert.equal(res.machine.vcpu_count, 2);
    assert.equal(res.machine.mem_size_mib, 64);
    assert.equal(res.boot.boot_args, '');
  });

  test('leading zeros are decimal, not octal', T, async () => {
    const { res } = await parseRunArgs(['--kernel', kernel, '--memory', '0064']);
    assert.equal(res.machine.mem_size_mib, 64);
  });

  for (const [flag, bad] of [
    ['vcpus', 'abc'],
    ['vcpus', '-1'],
    ['vcpus', '1.5'],
    ['vcpus', ''],
    ['vcpus', ' 2'],
    ['memory', 'abc'],
    ['memory', '0x40'],
    ['memory', '1e3'],
    ['memory', '64M'],
    ['memory', '-64'],
  ] as const) {
    test(`--${flag} ${JSON.stringify(bad)} is a ConfigError naming the flag`, T, async () => {
      await configError(
        ['--kernel', kernel, `--${flag}=${bad}`],
        new RegExp(
          `--${flag} must be a whole number from \\d+ to \\d+ \\(got "${bad.replace(/[.+]/g, '\\$&')}"\\)`,
        ),
      );
    });
  }

  test('out-of-range numbers are a ConfigError naming the flag and its limits', T, async () => {
    for (const [vcpus, mem, re] of [
      ['0', '64', /--vcpus must be a whole number from 1 to 64 \(got "0"\)/],
      ['65', '64', /--vcpus must be a whole number from 1 to 64 \(got "65"\)/],
      ['1', '1', /--memory must be a whole number from 16 to \d+ \(got "1"\)/],
      ['1', '99999999999', /--memory must be a whole number/],
    ] as const) {
      await configError(['--kernel', kernel, '--vcpus', vcpus, '--memory', mem], re);
    }
  });

  test('validation of the machine config names the API fields', T, () => {
    assert.throws(
      () => validateMachineConfig({ vcpu_count: 0, mem_size_mib: 64 }),
      (e: unknown) =>
        e instanceof ConfigError && /vcpu_count must be an integer from 1 to 64/.test(e.message),
    );
  });

  test('--huge-pages None|2M is machine-config huge_pages, reaching the spec', T, async () => {
    const { res } = await parseRunArgs([
      '--kernel',
      kernel,
      '--huge-pages',
      '2M',
      '--memory',
      '64',
    ]);
    assert.deepEqual(res.machine, { vcpu_count: 1, mem_size_mib: 64, huge_pages: '2M' });
    assert.equal(validateResources(res).hugePages, '2M');
    const none = await parseRunArgs([`--kernel=${kernel}`, '--huge-pages=None']);
    assert.deepEqual(none.res.machine, { vcpu_count: 1, mem_size_mib: 256, huge_pages: 'None' });
    assert.equal(validateResources(none.res).hugePages, undefined);
    // The default size (256 MiB) is even: 2M needs no --memory.
    const dflt = await parseRunArgs(['--kernel', kernel, '--huge-pages', '2M']);
    assert.equal(dflt.res.machine.mem_size_mib, 256);
  });

  test('--huge-pages: what the config path refuses is refused, naming the flags', T, async () => {
    for (const [argv, re] of [
      [
        ['--huge-pages', 'Transparent'],
        /^--huge-pages: "Transparent" is not supported \(use "None" or "2M"\)$/,
      ],
      [['--huge-pages', '1G'], /^--huge-pages: "1G" is not supported \(use "None" or "2M"\)$/],
      [['--huge-pages', '2m'], /^--huge-pages: "2m" is not supported/],
      [['--huge-pages', ''], /^--huge-pages: "" is not supported/],
      [
        ['--huge-pages', '2M', '--memory', '65'],
        /^--memory must be a multiple of 2 with --huge-pages "2M" \(got 65\)$/,
      ],
    ] as const)
      await configError(['--kernel', kernel, ...argv], re);
    // An odd size without huge pages is fine.
    const { res } = await parseRunArgs([
      '--kernel',
      kernel,
      '--huge-pages',
      'None',
      '--memory',
      '65',
    ]);
    assert.equal(res.machine.mem_size_mib, 65);
    await configError(['--kernel', kernel, '--huge-pages'], /--huge-pages/);
  });

  test(
    "--vsock: uds= is the unix backend, backend=vhost the kernel's; both reach the spec",
    T,
    async () => {
      const unix = await parseRunArgs(['--kernel', kernel, '--vsock', 'cid=3,uds=/run/v.sock']);
      assert.deepEqual(unix.res.vsock, { guest_cid: 3, uds_path: '/run/v.sock' });
      const vhost = await parseRunArgs(['--kernel', kernel, '--vsock', 'cid=7,backend=vhost']);
      assert.deepEqual(vhost.res.vsock, { guest_cid: 7, backend: 'vhost' });
      assert.deepEqual(validateResources(vhost.res).devices, [
        { kind: 'vsock', id: 'vsock', cid: 7, backend: 'vhost' },
      ]);
      // The conflict is the configuration's, named as the API names it.
      const dirty = await parseRunArgs([
        '--kernel',
        kernel,
        '--vsock',
        'cid=7,backend=vhost',
        '--track-dirty-pages',
      ]);
      assert.throws(
        () => validateResources(dirty.res),
        (e: unknown) =>
          e instanceof ConfigError &&
          /vhost backend cannot be used with track_dirty_pages/.test(e.message),
      );
      await configError(
        ['--kernel', kernel, '--vsock', 'cid=7,backend=vhost,uds=/run/v.sock'],
        /uds= is for the unix backend/,
      );
      assert.match(RUN_USAGE, /cid=N,backend=vhost/);
    },
  );

  test('an unknown flag is a ConfigError naming it', T, async () => {
    await configError(['--kernel', kernel, '--frobnicate'], /Unknown option '--frobnicate'/);
  });

  test('a positional argument is a ConfigError', T, async () => {
    await configError(['--kernel', kernel, 'extra'], /extra/);
  });

  test('a string option without its value is a ConfigError', T, async () => {
    await configError(['--kernel'], /--kernel/);
  });

  test('a value given to a boolean flag is a ConfigError', T, async () => {
    await configError(['--kernel', kernel, '--allow-pvm=yes'], /allow-pvm/);
  });

  test('--log-level must be one of the four levels', T, async () => {
    await configError(
      ['--kernel', kernel, '--log-level', 'loud'],
      /--log-level must be error, warn, info or debug/,
    );
    for (const l of ['error', 'warn', 'info', 'debug'])
      await parseRunArgs(['--kernel', kernel, '--log-level', l]);
  });

  test(
    'without --kernel: the default guest, or a ConfigError saying how to build it',
    T,
    async () => {
      try {
        const { res } = await parseRunArgs([]);
        assert.ok(res.boot.kernel_image_path.length > 0);
        assert.ok(res.boot.initrd_path, 'the default guest comes with its initramfs');
      } catch (e) {
        assert.ok(e instanceof ConfigError);
        assert.match(e.message, /npm run guest/);
      }
    },
  );

  test('an explicit --initrd wins over the default guest initramfs', T, async (t) => {
    let res;
    try {
      ({ res } = await parseRunArgs(['--initrd', '/mine']));
    } catch (e) {
      assert.ok(e instanceof ConfigError);
      t.skip('the default guest is not built here (npm run guest)');
      return;
    }
    assert.equal(res.boot.initrd_path, '/mine');
  });
});

describe('exit codes', () => {
  test('host problems 3, config and image problems 2, anything else 1', T, () => {
    assert.equal(exitCodeFor(new HostError('x')), EXIT_HOST);
    assert.equal(exitCodeFor(new ConfigError('x')), EXIT_USAGE);
    assert.equal(exitCodeFor(new ImageError('x')), EXIT_USAGE);
    assert.equal(exitCodeFor(new Error('x')), EXIT_GUEST_FAILED);
    assert.deepEqual([EXIT_GUEST_FAILED, EXIT_USAGE, EXIT_HOST], [1, 2, 3]);
  });

  test('the usage text lists every option parseRunArgs accepts', T, () => {
    for (const o of [
      '--kernel',
      '--initrd',
      '--cmdline',
      '--vcpus',
      '--memory',
      '--huge-pages',
      '--boot-timer',
      '--allow-pvm',
      '--log-level',
    ]) {
      assert.ok(RUN_USAGE.includes(o), o);
    }
  });
});

describe('run --restore arguments', () => {
  test('the load parameters, as PUT /snapshot/load takes them', T, () => {
    assert.ok(isRestore(['--restore', 's']) && isRestore(['--restore=s']) && !isRestore([]));
    assert.deepEqual(parseRestoreArgs(['--restore', 's', '--mem-file', 'm']), {
      snapshotPath: 's',
      memBackend: { type: 'File', path: 'm' },
      trackDirtyPages: false,
      resumeVm: true,
      clockRealtime: false,
      networkOverrides: [],
    });
    const p = parseRestoreArgs([
      '--restore=s',
      '--mem-file=m',
      '--net-override',
      'eth0=tap1',
      '--net-override',
      'eth1=tap2',
      '--vsock-uds',
      '/tmp/v.sock',
      '--paused',
      '--track-dirty-pages',
      '--clock-realtime',
    ]);
    assert.deepEqual(p.networkOverrides, [
      { ifaceId: 'eth0', hostDevName: 'tap1' },
      { ifaceId: 'eth1', hostDevName: 'tap2' },
    ]);
    assert.deepEqual(p.vsockOverride, { udsPath: '/tmp/v.sock' });
    assert.equal(p.resumeVm, false);
    assert.equal(p.trackDirtyPages, true);
    assert.equal(p.clockRealtime, true);
    assert.deepEqual(parseRestoreArgs(['--restore', 's', '--mem-uffd', '/tmp/h.sock']).memBackend, {
      type: 'Uffd',
      path: '/tmp/h.sock',
    });
  });

  test(
    'refused: VM-shaping flags, no --mem-file, a bad override, restore flags alone',
    T,
    async () => {
      const refused = (argv: string[], re: RegExp) =>
        assert.throws(
          () => parseRestoreArgs(argv),
          (e: unknown) => e instanceof ConfigError && re.test(e.message),
        );
      for (const f of [
        ['--kernel', kernel],
        ['--vcpus', '2'],
        ['--memory', '64'],
        ['--huge-pages', '2M'],
        ['--drive', `path=${kernel}`],
        ['--rng'],
        ['--rootfs'],
        ['--net', 'tap=t0'],
        ['--vsock', 'cid=3,uds=/tmp/x'],
        ['--cmdline', 'x'],
        ['--initrd', kernel],
      ])
        refused(
          ['--restore', 's', '--mem-file', 'm', ...f],
          new RegExp(`cannot be used with ${f[0]}`),
        );
      refused(['--restore', 's'], /--restore needs --mem-file \(or --mem-uffd\)/);
      refused(
        ['--restore', 's', '--mem-file', 'm', '--mem-uffd', 'h'],
        /--mem-file and --mem-uffd cannot be used together/,
      );
      await configError(['--kernel', kernel, '--mem-uffd', 'h'], /--mem-uffd needs --restore/);
      refused(['--restore', 's', '--mem-file', 'm', '--net-override', 'eth0'], /ID=TAP/);
      await configError(['--kernel', kernel, '--mem-file', 'm'], /--mem-file needs --restore/);
      await configError(['--kernel', kernel, '--paused'], /--paused needs --restore/);
    },
  );
});
