/**
 * `typervisor snapshot`: create a snapshot of a VM served on an API socket (a small
 * HTTP-over-Unix-socket client: pause, create, optionally resume), and inspect a state file.
 * Exit codes: 0 done; 2 bad arguments, a refused request or a bad file (one line on stderr).
 */
import { request } from 'node:http';
import { parseArgs } from 'node:util';
import { ConfigError } from '../util/errors.js';
import { readSnapshotFile, rebaseMemoryFile, SnapshotV1 } from '../vmm/index.js';

export const SNAPSHOT_USAGE = `usage: typervisor snapshot <create|inspect|rebase> [options]
  typervisor snapshot create --api-sock SOCK --snapshot-path STATE --mem-file-path MEM
                             [--type Full|Diff] [--resume]
      pauses the VM served on SOCK, writes its state and memory files, and resumes it with --resume
      (Diff: only the pages changed since the last snapshot; the VM must track dirty pages)
  typervisor snapshot inspect STATE [--json]
      verifies a state file (size, header, checksum, versions) and prints what it holds
  typervisor snapshot rebase --base MEM --diff DIFF_MEM
      merges a Diff memory file into the memory file of the snapshot before it (changed in
      place); load the Diff's state file with the merged file
Restore with PUT /snapshot/load, or: typervisor run --restore STATE --mem-file MEM`;

const EXIT_OK = 0;
const EXIT_FAILED = 2;

/** One line on stderr, exit 2. */
function fail(msg: string): number {
  process.stderr.write(`typervisor: ${msg.replace(/\s*\n\s*/g, ' ')}\n`);
  return EXIT_FAILED;
}

export async function snapshotCommand(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  switch (sub) {
    case 'create':
      return createCommand(rest);
    case 'inspect':
      return inspectCommand(rest);
    case 'rebase':
      return rebaseCommand(rest);
    case undefined:
    case '--help':
    case '-h':
    case 'help':
      process.stdout.write(SNAPSHOT_USAGE + '\n');
      return sub === undefined ? EXIT_FAILED : EXIT_OK;
    default:
      return fail(`snapshot: unknown subcommand "${sub}" (create, inspect or rebase)`);
  }
}

/** parseArgs' first line on a bad flag, as a ConfigError. */
function parsed<T>(f: () => T): T {
  try {
    return f();
  } catch (e) {
    throw new ConfigError((e as Error).message.split('\n')[0]!);
  }
}

/** One request to the API socket: status and fault message (if any). */
export function apiCall(
  sock: string,
  method: string,
  path: string,
  body: unknown,
  timeoutMs = 120_000,
): Promise<{ status: number; fault?: string }> {
  const data = JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath: sock,
        method,
        path,
        headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) },
        timeout: timeoutMs,
        agent: false,
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8').on('data', (c: string) => (text += c));
        res.on('end', () => {
          let fault: string | undefined;
          try {
            const j = text ? (JSON.parse(text) as { fault_message?: unknown }) : undefined;
            if (typeof j?.fault_message === 'string') fault = j.fault_message;
          } catch {
            fault = text.slice(0, 200);
          }
          resolve({ status: res.statusCode ?? 0, ...(fault !== undefined ? { fault } : {}) });
        });
      },
    );
    req.on('timeout', () =>
      req.destroy(new Error(`${method} ${path}: no answer in ${timeoutMs / 1000} s`)),
    );
    req.on('error', reject);
    req.end(data);
  });
}

async function createCommand(argv: string[]): Promise<number> {
  let v;
  try {
    v = parsed(() =>
      parseArgs({
        args: argv,
        strict: true,
        allowPositionals: false,
        options: {
          'api-sock': { type: 'string' },
          'snapshot-path': { type: 'string' },
          'mem-file-path': { type: 'string' },
          type: { type: 'string' },
          resume: { type: 'boolean' },
        },
      }),
    ).values;
  } catch (e) {
    return fail(`snapshot create: ${(e as Error).message}`);
  }
  const sock = v['api-sock'];
  const state = v['snapshot-path'];
  const mem = v['mem-file-path'];
  const type = v.type ?? 'Full';
  if (!sock || !state || !mem)
    return fail('snapshot create: --api-sock, --snapshot-path and --mem-file-path are required');
  if (type !== 'Full' && type !== 'Diff')
    return fail(`snapshot create: --type must be Full or Diff (got "${type}")`);
  const steps: Array<[string, string, unknown]> = [
    ['PATCH', '/vm', { state: 'Paused' }],
    ['PUT', '/snapshot/create', { snapshot_path: state, mem_file_path: mem, snapshot_type: type }],
  ];
  if (v.resume) steps.push(['PATCH', '/vm', { state: 'Resumed' }]);
  for (const [method, path, body] of steps) {
    let r;
    try {
      r = await apiCall(sock, method, path, body);
    } catch (e) {
      return fail(`snapshot create: ${sock}: ${(e as Error).message}`);
    }
    if (r.status >= 300) return fail(r.fault ?? `${method} ${path}: HTTP ${r.status}`);
  }
  return EXIT_OK;
}

/** A JSON-friendly summary: u64s as hex, byte blobs and long tables as their size. */
function summarize(v: unknown): unknown {
  if (typeof v === 'bigint') return `0x${v.toString(16)}`;
  if (v instanceof Uint8Array) return `${v.length} bytes`;
  if (Array.isArray(v)) return v.length > 16 ? `${v.length} entries` : v.map(summarize);
  if (typeof v === 'object' && v !== null)
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, summarize(x)]));
  return v;
}

const hex = (n: number) => `0x${n.toString(16)}`;

async function inspectCommand(argv: string[]): Promise<number> {
  let args;
  try {
    args = parsed(() =>
      parseArgs({
        args: argv,
        strict: true,
        allowPositionals: true,
        options: { json: { type: 'boolean' } },
      }),
    );
  } catch (e) {
    return fail(`snapshot inspect: ${(e as Error).message}`);
  }
  const [path, ...extra] = args.positionals;
  if (path === undefined || extra.length > 0)
    return fail('snapshot inspect: give exactly one state file');
  await Promise.resolve();
  const r = readSnapshotFile(path);
  if (!r.ok) return fail(`cannot read snapshot ${path}: ${r.error.message}`);
  const d = r.value;
  let config: unknown;
  try {
    config = JSON.parse(d.config);
  } catch {
    config = `unparsable (${d.config.length} characters)`;
  }
  const out = {
    path,
    record: { name: SnapshotV1.name, version: SnapshotV1.version },
    producer: summarize(d.producer),
    machine: summarize(d.machine),
    memory: summarize(d.memory),
    devices: d.devices.map((x) => ({ kind: x.kind, id: x.id, stateBytes: x.state.length })),
    legacy: summarize(d.legacy),
    vm: summarize(d.vm),
    vcpus: d.vcpus.map(summarize),
    config,
  };
  if (args.values.json) {
    process.stdout.write(JSON.stringify(out, null, 2) + '\n');
    return EXIT_OK;
  }
  const p = d.producer;
  const lines = [
    `${path}: ${SnapshotV1.name} v${SnapshotV1.version}, checksum ok`,
    `producer: typervisor ${p.version}, created ${new Date(p.createdUnixMs).toISOString()}` +
      (p.hostTscKhz !== undefined ? `, host TSC ${p.hostTscKhz} kHz` : ''),
    `machine: ${d.machine.vcpus} vCPU(s), ${d.machine.memMib} MiB`,
    `memory: ${d.memory.type}, page ${d.memory.pageSize} bytes, memory file ${d.memory.fileBytes} bytes`,
    ...d.memory.regions.map(
      (g, i) =>
        `  region ${i}: guest ${hex(g.base)}, ${g.size} bytes at file offset ${g.fileOffset}`,
    ),
    `devices: ${d.devices.length === 0 ? 'none' : ''}`,
    ...d.devices.map((x) => `  ${x.kind} ${x.id} (${x.state.length} bytes of state)`),
    ...d.vcpus.map(
      (c, i) =>
        `vcpu ${i}: rip 0x${c.regs.rip.toString(16)}, rsp 0x${c.regs.rsp.toString(16)}, ${c.msrs.length} MSRs`,
    ),
  ];
  process.stdout.write(lines.join('\n') + '\n');
  return EXIT_OK;
}

async function rebaseCommand(argv: string[]): Promise<number> {
  let v;
  try {
    v = parsed(() =>
      parseArgs({
        args: argv,
        strict: true,
        allowPositionals: false,
        options: { base: { type: 'string' }, diff: { type: 'string' } },
      }),
    ).values;
  } catch (e) {
    return fail(`snapshot rebase: ${(e as Error).message}`);
  }
  if (v.base === undefined || v.diff === undefined)
    return fail('snapshot rebase: --base and --diff are required');
  await Promise.resolve();
  let r;
  try {
    r = rebaseMemoryFile(v.base, v.diff);
  } catch (e) {
    return fail(`snapshot rebase: ${(e as Error).message}`);
  }
  process.stdout.write(
    `${v.base}: merged ${r.bytes} bytes in ${r.extents} extent(s) from ${v.diff}\n`,
  );
  return EXIT_OK;
}
