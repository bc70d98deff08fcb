/**
 * Snapshots: create (a paused VM -> a state file and a memory file) and load (those files -> a
 * paused or running VM in a fresh process). Interfaces only for now; the implementation follows.
 */
import { ConfigError } from '../util/errors.js';
import type { BuildOptions, BuiltVm } from './builder.js';

/** A snapshot request that cannot be done; the controller answers it with 400. */
export class SnapshotError extends ConfigError {}

export interface CreateParams {
  snapshotPath: string;
  memFilePath: string;
  type: 'Full' | 'Diff';
}

export interface LoadParams {
  snapshotPath: string;
  memBackend: { type: 'File' | 'Uffd'; path: string };
  trackDirtyPages: boolean;
  resumeVm: boolean;
  clockRealtime: boolean;
  networkOverrides: Array<{ ifaceId: string; hostDevName: string }>;
  vsockOverride?: { udsPath: string };
}

export async function createSnapshot(_built: BuiltVm, _p: CreateParams): Promise<void> {
  await Promise.resolve();
  throw new SnapshotError('Create snapshot error: not implemented yet');
}

export async function loadSnapshot(_p: LoadParams, _opts: BuildOptions): Promise<BuiltVm> {
  await Promise.resolve();
  throw new SnapshotError('Load snapshot error: not implemented yet');
}
