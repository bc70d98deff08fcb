// The import-boundary check (scripts/check-imports.mjs) in `npm test`: the real src/ obeys the
// layer rules, and the checker does catch a forbidden import in a synthetic tree. This runs
// from dist/src/, so it finds the checkout (and the .ts sources) by walking up from here.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath, pathToFileURL } from 'node:url';

interface Violation {
  file: string;
  line: number;
  layer: string;
  target: string;
  rule: string;
  message: string;
}
interface Checker {
  checkImports(
    root: string,
    opts?: { temporaryAllow?: string[] },
  ): { violations: Violation[]; files: number; imports: number };
  findImports(src: string): Array<{ spec: string; line: number }>;
  TEMPORARY_ALLOW: string[];
}

function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'scripts', 'check-imports.mjs'))) {
    const up = dirname(dir);
    if (up === dir) throw new Error('boundaries.test: cannot find the checkout root');
    dir = up;
  }
  return dir;
}

const root = repoRoot();
const checker = (await import(
  pathToFileURL(join(root, 'scripts', 'check-imports.mjs')).href
)) as Checker;

/** Runs the checker on a throwaway checkout holding only the given files. */
function check(files: Record<string, string>, temporaryAllow: string[] = []): Violation[] {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-boundaries-'));
  try {
    for (const [path, text] of Object.entries(files)) {
      mkdirSync(dirname(join(dir, path)), { recursive: true });
      writeFileSync(join(dir, path), text);
    }
    return checker.checkImports(dir, { temporaryAllow }).violations;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test('src/ obeys the layer rules (scripts/check-imports.mjs)', () => {
  const r = checker.checkImports(root);
  assert.ok(r.files > 50 && r.imports > 100, `scanned ${r.files} files, ${r.imports} imports`);
  assert.deepEqual(
    r.violations.map((v) => v.message),
    [],
  );
});

test('a device importing kvm is reported with its file, line and rule', () => {
  const v = check({
    'src/kvm/native.ts': 'export const native = {};\n',
    'src/util/log.ts': 'export const log = () => {};\n',
    'src/devices/x.ts':
      "import { log } from '../util/log.js';\n" +
      "// import { native } from '../kvm/native.js'; (a comment is not an import)\n" +
      'const s = "import(\'../kvm/native.js\')"; // nor is a string\n' +
      "import {\n  native,\n} from '../kvm/native.js';\n",
  });
  assert.deepEqual(
    v.map((x) => x.message),
    [
      'src/devices/x.ts:6: devices may not import src/kvm/native.ts (devices may import: memory, util, mmds)',
    ],
  );
});

test('type-only, re-export and dynamic imports count; the allowed directions pass', () => {
  const v = check({
    'src/kvm/types.ts': 'export interface Regs { rax: bigint }\n',
    'src/kvm/kvm.ts': "import type { Regs } from './types.js';\nexport type R = Regs;\n",
    'src/arch/x86_64/regs.ts': "import type { Regs } from '../../kvm/types.js';\n",
    'src/arch/x86_64/run.ts': "export type { R } from '../../kvm/kvm.js';\n",
    'src/vmm/index.ts': "export * from '../arch/x86_64/regs.js';\n",
    'src/vmm/builder.ts': "import '../kvm/kvm.js';\n",
    'src/cli/run.ts':
      "import { x } from '../vmm/index.js';\n" +
      "const b = await import('../vmm/builder.js');\n" +
      "const g = await import('../lab/guest.js');\n",
    'src/lab/guest.ts': "import '../vmm/index.js';\n",
  });
  assert.deepEqual(
    v.map((x) => x.message),
    [
      'src/arch/x86_64/run.ts:1: arch may not import src/kvm/kvm.ts (arch reaches kvm only through src/kvm/types.ts)',
      'src/cli/run.ts:2: cli may not import src/vmm/builder.ts (cli reaches vmm only through src/vmm/index.ts, src/vmm/vcpu-pool.ts)',
      'src/cli/run.ts:3: cli may not import src/lab/guest.ts (cli may import: api, vmm, uffd, util, sandbox, daemon)',
    ],
  );
});

test('the library (src/lib) reaches vmm through its public files only, and nothing above it', () => {
  const v = check({
    'src/vmm/index.ts': 'export const x = 1;\n',
    'src/vmm/vcpu-pool.ts': 'export const p = 1;\n',
    'src/vmm/builder.ts': 'export const b = 1;\n',
    'src/api/server.ts': 'export const s = 1;\n',
    'src/kvm/native.ts': 'export const native = {};\n',
    'src/lib/index.ts':
      "import { x } from '../vmm/index.js';\n" +
      "import { p } from '../vmm/vcpu-pool.js';\n" +
      "import { b } from '../vmm/builder.js';\n" +
      "import { s } from '../api/server.js';\n" +
      "import { native } from '../kvm/native.js';\n",
    'src/cli/run.ts': "import '../lib/index.js';\n",
  });
  assert.deepEqual(
    v.map((x) => x.message),
    [
      'src/cli/run.ts:1: cli may not import src/lib/index.ts (cli may import: api, vmm, uffd, util, sandbox, daemon)',
      'src/lib/index.ts:3: lib may not import src/vmm/builder.ts (lib reaches vmm only through src/vmm/index.ts, src/vmm/vcpu-pool.ts)',
      'src/lib/index.ts:4: lib may not import src/api/server.ts (lib may import: vmm, util, sandbox)',
      'src/lib/index.ts:5: lib may not import src/kvm/native.ts (lib may import: vmm, util, sandbox)',
    ],
  );
});

test('test-only helpers, files outside src/ and stray folders are caught', () => {
  const v = check({
    'src/devices/virtio/testing/mock-driver.ts': 'export const driver = 1;\n',
    'src/devices/virtio/rng.ts': "import { driver } from './testing/mock-driver.js';\n",
    'src/devices/virtio/rng.test.ts':
      "import { driver } from './testing/mock-driver.js';\nimport '../../../test/fixtures/a.js';\n",
    'src/devices/virtio/net.ts': "import '../../../test/fixtures/a.js';\n",
    'src/gadgets/x.ts': '\n',
  });
  assert.deepEqual(
    v.map((x) => x.rule),
    [
      'only tests may import files outside src/',
      'src/devices/virtio/testing/ is test-only: *.test.ts files may import it',
      'src/gadgets/ is not a layer: add it to LAYERS in scripts/check-imports.mjs',
    ],
  );
});

test('a TEMPORARY_ALLOW entry that is no longer needed fails the check', () => {
  const v = check({ 'src/api/ok.ts': "import '../vmm/index.js';\n" }, ['src/api/ok.ts']);
  assert.equal(v.length, 1);
  assert.match(v[0]!.message, /^src\/api\/ok\.ts:1: TEMPORARY_ALLOW entry no longer needed/);
});

test('the scanner finds imports in code only, with their line numbers', () => {
  const src = [
    "import a from './a.js'; // from './not-this.js'",
    '/* import b from "./b.js" */ const re = /[\'"]from \'x\'/;',
    'const t = `${`nested ${"./no.js"}`} import("./nor.js")`;',
    "export * as c from './c.js';",
    "type T = typeof import('./d.js');",
    'const div = 4 / 2; const e = await import("./e.js");',
  ].join('\n');
  assert.deepEqual(checker.findImports(src), [
    { spec: './a.js', line: 1 },
    { spec: './c.js', line: 4 },
    { spec: './d.js', line: 5 },
    { spec: './e.js', line: 6 },
  ]);
});
