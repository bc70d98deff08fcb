/**
 * A network namespace of a test's own, with a bridge, TAPs on it and a link-local host
 * address, removed again afterwards (even when the test failed). Everything stays inside the
 * namespace, so a test never touches the host's interfaces. Needs root and `ip` (iproute2 or
 * busybox), and the tun and bridge modules.
 */
import { spawnSync } from 'node:child_process';

export interface NetFixture {
  /** The namespace's name (`ip netns exec NAME ...`). */
  ns: string;
  /** The bridge's host address, without prefix length. */
  hostAddr: string;
  taps: string[];
  /** argv prefix that runs a command inside the namespace. */
  exec(argv: string[]): string[];
  cleanup(): void;
}

function ip(args: string[]): void {
  const r = spawnSync('ip', args, { encoding: 'utf8' });
  if (r.status !== 0)
    throw new Error(`ip ${args.join(' ')} failed: ${(r.stderr || r.error?.message || '').trim()}`);
}

/**
 * Creates namespace `tv-test-<pid>-<tag>` with bridge tvbr0 (hostAddr/16, in 169.254.0.0/16)
 * and `tapCount` TAPs (tvtap0...) enslaved to it, all up. The TAPs are persistent until
 * cleanup(); Typervisor attaches to them with TUNSETIFF.
 */
export function createNetFixture(
  tag: string,
  tapCount: number,
  hostAddr = '169.254.10.1',
): NetFixture {
  const ns = `tv-test-${process.pid}-${tag}`;
  spawnSync('modprobe', ['tun']);
  spawnSync('modprobe', ['bridge']);
  ip(['netns', 'add', ns]);
  const f: NetFixture = {
    ns,
    hostAddr,
    taps: [],
    exec: (argv) => ['ip', 'netns', 'exec', ns, ...argv],
    cleanup: () => {
      spawnSync('ip', ['netns', 'delete', ns]); // takes the bridge and TAPs with it
    },
  };
  try {
    const inNs = (args: string[]) => ip(['-n', ns, ...args]);
    inNs(['link', 'set', 'lo', 'up']);
    inNs(['link', 'add', 'tvbr0', 'type', 'bridge']);
    inNs(['addr', 'add', `${hostAddr}/16`, 'dev', 'tvbr0']);
    inNs(['link', 'set', 'tvbr0', 'up']);
    for (let i = 0; i < tapCount; i++) {
      const tap = `tvtap${i}`;
      inNs(['tuntap', 'add', 'dev', tap, 'mode', 'tap', 'vnet_hdr']);
      inNs(['link', 'set', tap, 'master', 'tvbr0']);
      inNs(['link', 'set', tap, 'up']);
      f.taps.push(tap);
    }
  } catch (e) {
    f.cleanup();
    throw e;
  }
  return f;
}
