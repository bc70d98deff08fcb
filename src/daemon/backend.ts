/**
 * What the daemon needs of an isolation mode: create a VM from a checked request, and report the
 * warm pool. `process` (process-backend.ts): a VMM process per VM; `shared`
 * (shared-backend.ts): VMs in the daemon's own process. The shared one is written over the
 * internal VMM surface (VmmController + buildVm) behind this interface, so that it can move to
 * the public library API without the daemon changing.
 */
import type { CreateRequest } from './api.js';

export type Mode = 'process' | 'shared';
export const MODES: readonly Mode[] = ['process', 'shared'];

/** How a VM ended. */
export interface VmEnd {
  /** exited: the guest powered off or rebooted; stopped: on request; crashed: anything else. */
  state: 'exited' | 'stopped' | 'crashed';
  code: number | null;
  signal: string | null;
  reason: string;
}

export interface VmHandle {
  /** The VMM process (process mode), or undefined (shared). */
  readonly pid?: number;
  /** The VM's Firecracker-compatible API socket. */
  readonly apiSocket: string;
  /** monoMs() when the daemon first saw the guest's boot marker, or undefined. */
  readonly markerAt: number | undefined;
  /** monoMs() of the first console byte, or undefined. */
  readonly firstOutputAt: number | undefined;
  /** Settles once the VM has ended and its resources (process, socket) are released. */
  readonly ended: Promise<VmEnd>;
  /** Asks the VM to stop; `ended` settles within the mode's bound (a stuck VMM is killed). */
  stop(): void;
  /** The last bytes of the console output (bounded), as text. */
  consoleTail(): string;
}

/** A create refused by the VMM (its fault message) or impossible now (503: no capacity). */
export class CreateError extends Error {
  constructor(
    readonly status: 400 | 500 | 503,
    message: string,
  ) {
    super(message);
  }
}

export interface PoolInfo {
  mode: Mode;
  /** The warm pool's target size. */
  size: number;
  /** Warm and ready to take a VM now. */
  ready: number;
  /** Being started (counts toward the target). */
  starting: number;
  /** Warm VMM processes started since the daemon began (process mode). */
  started_total: number;
  /** Warm VMM processes that failed to start or died before use. */
  failed_total: number;
  /** Creates that found the pool empty and waited for a cold start. */
  cold_starts: number;
  last_error?: string;
}

/** What a garbage collection did (VmHost.collectGarbage). */
export interface Collected {
  /** The main thread's heap was collected (false: no gc exposed), and in how many ms. */
  main: boolean;
  mainMs: number;
  /** Idle vCPU workers that collected theirs. */
  workers: number;
}

export interface Backend {
  readonly mode: Mode;
  /** Creates and starts the VM `id` (its socket `apiSocket`); throws CreateError on a fault. */
  create(id: string, apiSocket: string, req: CreateRequest): Promise<VmHandle>;
  pool(): PoolInfo;
  /**
   * Shared mode: a full garbage collection of the daemon's V8 heaps, its own and its idle
   * vCPU workers' (VmHost.collectGarbage), before the idle trim (trim.ts).
   */
  collectGarbage?(): Promise<Collected>;
  /** Stops filling the pool and ends the warm processes (not the VMs: the daemon stops those). */
  close(): Promise<void>;
}

/** A bounded tail of a byte stream. */
export class ByteTail {
  private chunks: Buffer[] = [];
  private size = 0;
  total = 0;
  constructor(private readonly max: number) {}
  push(b: Buffer): void {
    this.total += b.length;
    this.chunks.push(b);
    this.size += b.length;
    while (this.size - this.chunks[0]!.length >= this.max) this.size -= this.chunks.shift()!.length;
  }
  text(): string {
    const all = Buffer.concat(this.chunks);
    return all.subarray(Math.max(0, all.length - this.max)).toString('utf8');
  }
}
