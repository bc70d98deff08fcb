/**
 * Reading the counting tiny guests' console (test/guests/tiny.S MODE_COUNT, countmem.elf):
 * a banner, then one 8-digit hex number per line. Shared by the snapshot, Diff and clone tests.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import type { BuiltVm } from '../../src/vmm/builder.js';
import { eventually } from './helpers.js';

export const BANNER = 'tiny guest up\n';

/** Complete hex lines of a console text (the banner and a cut last line left out). */
export function numbers(text: string): number[] {
  const body = text.startsWith(BANNER) ? text.slice(BANNER.length) : text;
  const lines = body.split('\n');
  lines.pop(); // after the last '\n': empty, or a line cut short
  return lines.map((l) => {
    assert.match(l, /^[0-9a-f]{8}$/, `console line ${JSON.stringify(l)}`);
    return parseInt(l, 16);
  });
}

export function assertConsecutive(ns: number[], what: string): void {
  for (let i = 1; i < ns.length; i++)
    assert.equal(ns[i], ns[i - 1]! + 1, `${what}: ${ns[i - 1]} then ${ns[i]} (line ${i})`);
}

export async function until(f: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!f()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

export const lineCount = (s: string) => s.split('\n').length - 1;

/**
 * The counter lines a console file holds (8 hex digits each), as numbers; `before`: the start of
 * a line the file continues (cutLine of the snapshotted VM's console).
 */
export function counts(file: string, before = ''): number[] {
  return countsIn(before + readFileSync(file, 'utf8'));
}

/**
 * What a console's text holds after its last whole line: the start of a line when a snapshot's
 * pause fell in the middle of one (the restored VM then prints the rest).
 */
export function cutLine(text: string): string {
  return text.slice(text.lastIndexOf('\n') + 1);
}

/** The counter lines of a console's text (8 hex digits each), as numbers. */
export function countsIn(text: string): number[] {
  return text
    .split('\n')
    .filter((l) => /^[0-9a-f]{8}$/.test(l))
    .map((l) => parseInt(l, 16));
}

/** Waits (up to 20 s) until the console file holds at least n counter lines. */
export async function lines(file: string, n: number): Promise<void> {
  assert.ok(
    await eventually(() => counts(file).length >= n, 20_000),
    `${n} lines in ${file} (have ${counts(file).length})`,
  );
}

/** Stops a VM built in this process and waits for it to end. */
export async function stop(vm: BuiltVm): Promise<void> {
  vm.vmm.requestStop();
  await vm.vmm.exited;
}
