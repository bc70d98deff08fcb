#!/usr/bin/env node
// Runs node's test runner over every compiled *.test.js under the given folders of dist/
// (Node 20's runner takes files, not globs). Usage: node scripts/run-tests.mjs src test/host
import { readdirSync, statSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';

const root = new URL('..', import.meta.url).pathname;
const files = [];
const walk = (d) => {
  for (const e of readdirSync(d)) {
    const p = join(d, e);
    if (statSync(p).isDirectory()) walk(p);
    else if (p.endsWith('.test.js')) files.push(p);
  }
};
for (const dir of process.argv.slice(2)) {
  const d = join(root, 'dist', dir);
  if (existsSync(d)) walk(d);
}
if (files.length === 0) {
  console.error(`no test files under ${process.argv.slice(2).join(', ')}`);
  process.exit(1);
}
const r = spawnSync(process.execPath, ['--test', ...files.sort()], { stdio: 'inherit' });
process.exit(r.status ?? 1);
