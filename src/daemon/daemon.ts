/**
 * The daemon's VM table and the answers to its API (api.ts): create (through the mode's
 * backend), list, get, stop, delete, the pool. Bounded: at most `maxVms` VMs being created or
 * running (one more is refused 503 and counted), and at most MAX_ENDED_RECORDS ended VMs kept for
 * GET (the oldest is forgotten first).
 */
import { getHeapSpaceStatistics } from 'node:v8';
import type { ApiOutcome } from '../api/controller.js';
import type { Counters } from '../api/metrics.js';
import { log } from '../util/log.js';
import type { CreateRequest, DaemonAction } from './api.js';
import { CreateError, type Backend, type VmEnd, type VmHandle } from './backend.js';
import type { StateDir } from './state.js';
import type { IdleTrim } from './trim.js';
import { monoMs } from '../util/clock.js';

export const DEFAULT_MAX_VMS = 256;
export const MAX_ENDED_RECORDS = 256;
/**
 * GET /vms/{id}/wait answers at the latest after this long (the VM as it is then): below the
 * API server's 30 s idle-socket limit, so a waiting client is answered, never cut off.
 */
export const WAIT_MAX_MS = 20_000;
/** sizeof(sockaddr_un.sun_path) - 1. */
const MAX_SOCKET_PATH = 107;

type VmState = 'starting' | 'running' | 'stopping' | VmEnd['state'];

interface VmEntry {
  id: string;
  state: VmState;
  apiSocket: string;
  createdAt: string;
  /** monoMs() when the create request was taken. */
  t0: number;
  createMs?: number;
  handle?: VmHandle;
  end?: VmEnd;
}

const ok = (body: unknown): ApiOutcome => ({ status: 200, body });
const NO_CONTENT: ApiOutcome = { status: 204 };
const fault = (status: number, message: string): ApiOutcome =>
  ({ status, fault: message }) as ApiOutcome;

export class Daemon {
  private readonly vms = new Map<string, VmEntry>();
  private readonly ended: string[] = [];
  private seq = 0;
  private closing = false;
  /** Creates in progress (shutdown waits for them, then stops their VMs). */
  private readonly creating = new Set<Promise<unknown>>();

  constructor(
    private readonly backend: Backend,
    private readonly state: StateDir,
    private readonly counters: Counters,
    private readonly maxVms = DEFAULT_MAX_VMS,
    /** Shared mode: glibc's malloc trim once the daemon is idle after VMs ended (trim.ts). */
    private readonly trim?: IdleTrim,
  ) {}

  private live(): number {
    let n = 0;
    for (const v of this.vms.values()) if (v.end === undefined) n++;
    return n;
  }

  private info(v: VmEntry): Record<string, unknown> {
    const h = v.handle;
    const since = (t: number | undefined) =>
      t === undefined ? null : Math.round((t - v.t0) * 100) / 100;
    return {
      id: v.id,
      state: v.state,
      api_socket: v.apiSocket,
      pid: h?.pid ?? null,
      created_at: v.createdAt,
      create_ms: v.createMs ?? null,
      boot_marker_ms: since(h?.markerAt),
      first_output_ms: since(h?.firstOutputAt),
      ...(v.end ? { exit: { code: v.end.code, signal: v.end.signal, reason: v.end.reason } } : {}),
    };
  }

  async handle(a: DaemonAction): Promise<ApiOutcome> {
    switch (a.kind) {
      case 'GetDaemon':
        return ok({
          mode: this.backend.mode,
          pid: process.pid,
          state_dir: this.state.dir,
          vms: this.live(),
          max_vms: this.maxVms,
          memory: { ...daemonMemory(), ...(this.trim ? { malloc_trim: this.trim.stats } : {}) },
        });
      case 'GetPool':
        return ok({ ...this.backend.pool(), vms: this.live(), max_vms: this.maxVms });
      case 'ListVms':
        return ok({ vms: [...this.vms.values()].map((v) => this.info(v)) });
      case 'CreateVm':
        return this.create(a.request);
      case 'GetVm': {
        const v = this.vms.get(a.id);
        return v ? ok(this.info(v)) : this.unknown(a.id);
      }
      case 'GetConsole': {
        const v = this.vms.get(a.id);
        return v ? ok({ id: v.id, output: v.handle?.consoleTail() ?? '' }) : this.unknown(a.id);
      }
      case 'WaitVm': {
        const v = this.vms.get(a.id);
        if (!v) return this.unknown(a.id);
        if (v.state === 'starting')
          return fault(400, `VM ${a.id} is being created; wait for it once it runs`);
        if (v.end === undefined && v.handle) {
          let t: NodeJS.Timeout | undefined;
          await Promise.race([
            v.handle.ended,
            new Promise((r) => (t = setTimeout(r, WAIT_MAX_MS))),
          ]);
          clearTimeout(t);
        }
        return ok(this.info(v));
      }
      case 'StopVm': {
        const v = this.vms.get(a.id);
        if (!v) return this.unknown(a.id);
        if (v.state === 'starting')
          return fault(400, `VM ${a.id} is being created; stop it once it runs`);
        if (v.end === undefined && v.handle) {
          v.state = 'stopping';
          v.handle.stop();
          await v.handle.ended;
        }
        return NO_CONTENT;
      }
      case 'DeleteVm': {
        const v = this.vms.get(a.id);
        if (!v) return this.unknown(a.id);
        if (v.state === 'starting')
          return fault(400, `VM ${a.id} is being created; delete it once it runs`);
        if (v.end === undefined && v.handle) {
          v.state = 'stopping';
          v.handle.stop();
          await v.handle.ended;
        }
        this.vms.delete(a.id);
        const i = this.ended.indexOf(a.id);
        if (i >= 0) this.ended.splice(i, 1);
        this.trim?.note();
        return NO_CONTENT;
      }
    }
  }

  private unknown(id: string): ApiOutcome {
    return fault(404, `No VM with id ${id}.`);
  }

  private async create(req: CreateRequest): Promise<ApiOutcome> {
    if (this.closing) return fault(503, 'The daemon is shutting down.');
    if (this.live() >= this.maxVms) {
      this.counters.inc('daemon', 'vm_cap_hits');
      return fault(503, `At most ${this.maxVms} VMs may run at once (--max-vms).`);
    }
    let id = req.id;
    if (id === undefined) {
      do id = `vm-${++this.seq}`;
      while (this.vms.has(id));
    } else if (this.vms.has(id)) return fault(400, `A VM with id ${id} exists already.`);
    const apiSocket = this.state.path(`${id}.sock`);
    if (Buffer.byteLength(apiSocket) > MAX_SOCKET_PATH)
      return fault(
        400,
        `The VM's API socket path ${apiSocket} is longer than ${MAX_SOCKET_PATH} bytes: use a shorter id or --state-dir.`,
      );
    const v: VmEntry = {
      id,
      state: 'starting',
      apiSocket,
      createdAt: new Date().toISOString(),
      t0: monoMs(),
    };
    this.vms.set(id, v);
    let h: VmHandle;
    const pending = this.backend.create(id, apiSocket, req);
    this.creating.add(pending);
    try {
      h = await pending;
    } catch (e) {
      this.vms.delete(id);
      this.counters.inc('daemon', 'create_fails');
      if (e instanceof CreateError) return fault(e.status, e.message);
      throw e;
    } finally {
      this.creating.delete(pending);
    }
    if (this.closing) h.stop();
    v.handle = h;
    v.createMs = Math.round((monoMs() - v.t0) * 100) / 100;
    if (v.end === undefined) v.state = 'running';
    void h.ended.then((end) => {
      v.end = end;
      v.state = end.state;
      if (end.state === 'crashed') log('warn', `daemon: VM ${v.id} crashed: ${end.reason}`);
      if (this.vms.get(v.id) === v) this.remember(v.id);
      this.trim?.note();
    });
    return ok(this.info(v));
  }

  /** Keeps at most MAX_ENDED_RECORDS ended VMs, forgetting the oldest. */
  private remember(id: string): void {
    this.ended.push(id);
    while (this.ended.length > MAX_ENDED_RECORDS) {
      this.vms.delete(this.ended.shift()!);
      this.counters.inc('daemon', 'ended_records_dropped');
    }
  }

  /** Stops every VM (each within its mode's bound) and the pool. */
  async shutdown(): Promise<void> {
    this.closing = true;
    this.trim?.close();
    await Promise.allSettled([...this.creating]);
    const running = [...this.vms.values()].filter((v) => v.end === undefined && v.handle);
    for (const v of running) v.handle!.stop();
    await Promise.all(running.map((v) => v.handle!.ended));
    await this.backend.close();
  }
}

/**
 * The daemon process's resident memory and its main thread's V8 heap, space by space (bytes
 * reserved, bytes used): where a growing RSS goes. The young generation (`new_space`) doubles
 * under a high allocation rate and is not given back; the old generation holds what is live.
 */
export function daemonMemory(): {
  rss_bytes: number;
  heap: Record<string, { size: number; used: number }>;
} {
  const heap: Record<string, { size: number; used: number }> = {};
  for (const sp of getHeapSpaceStatistics())
    if (sp.space_size > 0) heap[sp.space_name] = { size: sp.space_size, used: sp.space_used_size };
  return { rss_bytes: process.memoryUsage.rss(), heap };
}
