import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { CpuidEntry } from '../../kvm/types.js';
import { ConfigError } from '../../util/errors.js';
import {
  applyBitmap,
  applyTemplateToCpuid,
  applyTemplateToMsrs,
  cpuidTemplateNotApplied,
  formatBitmap,
  parseBitmap,
  parseCpuTemplate,
  parseIndex,
  requiredKvmCapabilities,
  templateMsrAddrs,
  wireCpuTemplate,
} from './cpu-template.js';
import {
  CPU_MODEL,
  STATIC_CPU_TEMPLATES,
  resolveCpuTemplate,
  resolveStaticCpuTemplate,
  staticCpuTemplate,
} from './cpu-template-static.js';

const E = (fn: number, index: number, eax: number, ebx = 0, ecx = 0, edx = 0): CpuidEntry => ({
  function: fn,
  index,
  flags: 0,
  eax,
  ebx,
  ecx,
  edx,
});
/** Leaf 0 registers spelling a vendor string (EBX, EDX, ECX order). */
function leaf0(v: string): CpuidEntry {
  const r = (o: number) =>
    (v.charCodeAt(o) |
      (v.charCodeAt(o + 1) << 8) |
      (v.charCodeAt(o + 2) << 16) |
      (v.charCodeAt(o + 3) << 24)) >>>
    0;
  return E(0, 0, 0x1f, r(0), r(8), r(4));
}

test('bitmaps: 0/1 set the bit, x keeps it, _ is a separator; short strings keep the high bits', () => {
  assert.deepEqual(parseBitmap('0b1x0', 32), { filter: 0b101n, value: 0b100n });
  assert.deepEqual(parseBitmap('1x0', 32), { filter: 0b101n, value: 0b100n }); // no prefix
  assert.deepEqual(parseBitmap('0b1_0', 32), { filter: 0b11n, value: 0b10n });
  const full = parseBitmap('0b' + '1'.repeat(32), 32);
  assert.deepEqual(full, { filter: 0xffff_ffffn, value: 0xffff_ffffn });
  const msr = parseBitmap('0b1' + 'x'.repeat(62) + '0', 64);
  assert.deepEqual(msr, { filter: (1n << 63n) | 1n, value: 1n << 63n });
  // apply: (reg & ~filter) | value
  assert.equal(applyBitmap(0b0110n, parseBitmap('1x0x', 32)), 0b1100n);
  assert.equal(applyBitmap(0xffn, parseBitmap('0b0000', 32)), 0xf0n);
});

test('bitmaps: bad characters, too many bits, empty, wrong type are refused by name', () => {
  assert.throws(() => parseBitmap('0b10201', 32, 'm.bitmap'), {
    name: 'ConfigError',
    message: /^m\.bitmap: "0b10201" has "2"; a bitmap has only 0, 1, x \(keep\) and _$/,
  });
  assert.throws(() => parseBitmap('0b' + '1'.repeat(33), 32), /has more than 32 bits/);
  assert.throws(() => parseBitmap('0b' + 'x'.repeat(65), 64), /has more than 64 bits/);
  assert.doesNotThrow(() => parseBitmap('0b' + 'x'.repeat(64), 64));
  assert.throws(() => parseBitmap('0b', 32), /has no bits/);
  assert.throws(() => parseBitmap('0b___', 32), /has no bits/);
  assert.throws(() => parseBitmap(5, 32), /expected a string, got 5/);
  assert.throws(() => parseBitmap('0x1f', 32), /has "f"/);
  assert.throws(() => parseBitmap('1'.repeat(1000), 64), /too long/);
});

test('bitmaps format back the way Firecracker writes them', () => {
  for (const s of ['0b' + 'x'.repeat(28) + '10x1', '0b' + '01'.repeat(16)]) {
    assert.equal(formatBitmap(parseBitmap(s, 32), 32), s);
  }
  assert.equal(formatBitmap(parseBitmap('1', 64), 64), '0b' + 'x'.repeat(63) + '1');
});

test('leaf, subleaf and MSR addresses: hex, binary or decimal, 32 bits', () => {
  assert.equal(parseIndex('0x8000_0001', 'leaf'), 0x8000_0001);
  assert.equal(parseIndex('0b101', 'leaf'), 5);
  assert.equal(parseIndex('266', 'addr'), 266);
  assert.equal(parseIndex('0xffffffff', 'leaf'), 0xffff_ffff);
  assert.throws(
    () => parseIndex('0x1_0000_0000', 'leaf'),
    /leaf: .* (is not a number|does not fit)/,
  );
  assert.throws(() => parseIndex('4294967296', 'leaf'), /does not fit in 32 bits/);
  assert.throws(() => parseIndex('-1', 'x.leaf'), /ConfigError: x\.leaf: "-1" is not a number/);
  assert.throws(() => parseIndex(1, 'x.leaf'), /expected a string such as "0x1", got 1/);
  assert.throws(() => parseIndex('0xg', 'leaf'), /is not a number/);
});

const TEMPLATE = {
  kvm_capabilities: ['121', '!55'],
  cpuid_modifiers: [
    {
      leaf: '0x1',
      subleaf: '0x0',
      flags: 0,
      modifiers: [
        { register: 'ecx', bitmap: '0bx0' + 'x'.repeat(30) }, // clear bit 30
        { register: 'edx', bitmap: '0b1' },
      ],
    },
    { leaf: '0x7', subleaf: '0', flags: 1, modifiers: [{ register: 'ebx', bitmap: '0b00' }] },
  ],
  msr_modifiers: [{ addr: '0x10a', bitmap: '0b1x0' }],
};

test('a custom template parses, and its wire form parses back to the same template', () => {
  const t = parseCpuTemplate(TEMPLATE);
  assert.deepEqual(t.kvm_capabilities, [
    { cap: 121, remove: false },
    { cap: 55, remove: true },
  ]);
  assert.equal(t.cpuid_modifiers[1]!.leaf, 7);
  assert.equal(t.cpuid_modifiers[1]!.flags, 1);
  assert.deepEqual(t.msr_modifiers, [{ addr: 0x10a, bitmap: { filter: 5n, value: 4n } }]);
  const wire = wireCpuTemplate(t);
  assert.equal((wire.msr_modifiers as Array<{ addr: string }>)[0]!.addr, '0x10a');
  assert.deepEqual(parseCpuTemplate(JSON.parse(JSON.stringify(wire))), t);
  // Empty and aarch64-empty are fine (the API description lists those arrays).
  assert.deepEqual(parseCpuTemplate({}), {
    kvm_capabilities: [],
    cpuid_modifiers: [],
    msr_modifiers: [],
  });
  assert.doesNotThrow(() => parseCpuTemplate({ reg_modifiers: [], vcpu_features: [] }));
  assert.deepEqual(
    requiredKvmCapabilities(parseCpuTemplate({ kvm_capabilities: ['9', '9', '!7'] })),
    [9],
  );
  assert.deepEqual(
    requiredKvmCapabilities(parseCpuTemplate({ kvm_capabilities: ['9', '!9'] })),
    [],
  );
});

test('a bad custom template is refused naming the field, and a ConfigError (never a TypeError)', () => {
  const bad = (v: unknown, re: RegExp) =>
    assert.throws(
      () => parseCpuTemplate(v),
      (e: Error) => e instanceof ConfigError && re.test(e.message),
      String(re),
    );
  const leaf = (m: object) => ({
    cpuid_modifiers: [{ leaf: '0x1', subleaf: '0x0', flags: 0, modifiers: [], ...m }],
  });
  bad([], /^cpu-config: expected an object, got an array/);
  bad(null, /expected an object, got null/);
  bad({ cpuid_modifier: [] }, /unknown field `cpuid_modifier`/);
  bad({ reg_modifiers: [{ addr: '0x1', bitmap: '0b1' }] }, /reg_modifiers: aarch64 only/);
  bad({ vcpu_features: [{ index: 0, bitmap: '0b1' }] }, /vcpu_features: aarch64 only/);
  bad({ cpuid_modifiers: {} }, /cpuid_modifiers: expected an array, got an object/);
  bad(leaf({ leaf: 1 }), /cpuid_modifiers\[0\]\.leaf: expected a string/);
  bad(leaf({ flags: 8 }), /cpuid_modifiers\[0\]\.flags: 8 is not a set of KVM CPUID flags/);
  bad(leaf({ flags: '1' }), /flags: "1" is not a set/);
  bad(leaf({ modifiers: undefined }), /cpuid_modifiers\[0\]: missing field `modifiers`/);
  bad(
    leaf({ modifiers: [{ register: 'rax', bitmap: '0b1' }] }),
    /modifiers\[0\]\.register: "rax" is not a CPUID register/,
  );
  bad(leaf({ modifiers: [{ register: 'eax' }] }), /modifiers\[0\]: missing field `bitmap`/);
  bad(
    leaf({ modifiers: [{ register: 'eax', bitmap: '0b1', x: 1 }] }),
    /modifiers\[0\]: unknown field `x`/,
  );
  bad(
    { msr_modifiers: [{ addr: '0x10a', bitmap: '0b' + '1'.repeat(65) }] },
    /msr_modifiers\[0\]\.bitmap: .* more than 64 bits/,
  );
  bad({ kvm_capabilities: ['abc'] }, /kvm_capabilities\[0\]: "abc" is not a capability/);
  bad({ kvm_capabilities: [121] }, /kvm_capabilities\[0\]: 121 is not a capability/);
  bad(
    { cpuid_modifiers: new Array(257).fill(leaf({}).cpuid_modifiers[0]) },
    /257 entries; at most 256/,
  );
  bad(leaf({ modifiers: new Array(17).fill({ register: 'eax', bitmap: '1' }) }), /at most 16/);
});

test("CPUID modifiers apply to KVM's table (flags too) and leave the input alone; a missing leaf is an error", () => {
  const host = [E(1, 0, 0x10, 0, 0xffff_ffff, 0), E(7, 0, 0, 0b11), E(0xd, 0, 5)];
  const before = structuredClone(host);
  const out = applyTemplateToCpuid(host, parseCpuTemplate(TEMPLATE));
  assert.deepEqual(host, before);
  assert.equal(out[0]!.ecx, 0xbfff_ffff); // bit 30 cleared, the rest kept
  assert.equal(out[0]!.edx, 1);
  assert.equal(out[0]!.eax, 0x10);
  assert.equal(out[1]!.ebx, 0);
  assert.equal(out[1]!.flags, 1);
  assert.deepEqual(out[2], host[2]);
  assert.throws(
    () => applyTemplateToCpuid([E(1, 0, 0)], parseCpuTemplate(TEMPLATE)),
    /changes CPUID leaf 0x7 subleaf 0x0, which this host's KVM does not support/,
  );
});

test('MSR modifiers apply to the values read; an MSR KVM does not give is an error', () => {
  const t = parseCpuTemplate({
    msr_modifiers: [
      { addr: '0x10a', bitmap: '0b1x0' },
      { addr: '0x10a', bitmap: '0b1' + 'x'.repeat(63) },
      { addr: '0x48', bitmap: '0b0' },
    ],
  });
  assert.deepEqual(templateMsrAddrs(t), [0x10a, 0x48]);
  const out = applyTemplateToMsrs(
    new Map([
      [0x10a, 0b011n],
      [0x48, 0xffn],
    ]),
    t,
  );
  assert.equal(out.get(0x10a), (1n << 63n) | 0b110n);
  assert.equal(out.get(0x48), 0xfen);
  assert.throws(
    () => applyTemplateToMsrs(new Map([[0x10a, 0n]]), t),
    /changes MSR 0x48, which this host's KVM does not support/,
  );
});

test('static templates: refused on another vendor or CPU model, applied on the right one', () => {
  const milan = [leaf0('AuthenticAMD'), E(1, 0, CPU_MODEL.MILAN | 0x3000)]; // type bits ignored
  const genoa = [leaf0('AuthenticAMD'), E(1, 0, 0x00a1_0f11)];
  const skylake = [leaf0('GenuineIntel'), E(1, 0, CPU_MODEL.SKYLAKE)];
  assert.throws(
    () => resolveStaticCpuTemplate('T2', milan),
    /ConfigError: cpu_template T2 is for Intel hosts; this host's CPU vendor is AuthenticAMD$/,
  );
  assert.throws(
    () => resolveStaticCpuTemplate('T2A', skylake),
    /cpu_template T2A is for AMD hosts; this host's CPU vendor is GenuineIntel/,
  );
  assert.throws(
    () => resolveStaticCpuTemplate('T2A', genoa),
    /T2A does not support this host's CPU model \(family 0x19 model 0x11 stepping 1\); it is made for family 0x19 model 0x1 stepping 1/,
  );
  assert.throws(
    () => resolveStaticCpuTemplate('T2CL', skylake),
    /does not support this host's CPU model/,
  );
  assert.throws(() => resolveStaticCpuTemplate('T3', skylake), /"T3" is not a CPU template/);
  assert.deepEqual(resolveStaticCpuTemplate('T2A', milan), staticCpuTemplate('T2A'));
  assert.deepEqual(resolveStaticCpuTemplate('T2S', skylake), staticCpuTemplate('T2S'));
  assert.equal(resolveCpuTemplate(undefined, skylake), undefined);
  const custom = parseCpuTemplate({});
  assert.equal(resolveCpuTemplate({ custom }, skylake), custom);
});

test('static templates are well formed and do what they say', () => {
  for (const name of STATIC_CPU_TEMPLATES) {
    const t = staticCpuTemplate(name);
    // Round trip through Firecracker's JSON form: every bitmap is a valid one.
    assert.deepEqual(parseCpuTemplate(JSON.parse(JSON.stringify(wireCpuTemplate(t)))), t, name);
    for (const m of t.cpuid_modifiers)
      for (const r of m.modifiers) assert.equal(r.bitmap.value & ~r.bitmap.filter, 0n, name);
  }
  // T2A on an AMD Milan: leaf 1 reports the Intel-style family/model of the T2 baseline and the
  // 0x8000_0008 EBX bits it sets; bits it does not name pass through.
  const host = [
    leaf0('AuthenticAMD'),
    E(1, 0, CPU_MODEL.MILAN, 0x0080_0800, 0xffff_ffff, 0xffff_ffff),
    E(7, 0, 0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff),
    E(0xd, 0, 0xffff_ffff),
    E(0xd, 1, 0xffff_ffff),
    E(0x8000_0001, 0, 0, 0, 0xffff_ffff, 0xffff_ffff),
    E(0x8000_0008, 0, 0x3030, 0),
  ];
  const out = applyTemplateToCpuid(host, resolveStaticCpuTemplate('T2A', host));
  const l1 = out.find((e) => e.function === 1)!;
  assert.equal(l1.eax, 0x0003_06f2 | (CPU_MODEL.MILAN & 0xf000_c000));
  assert.equal(l1.ebx, 0x0080_0800);
  assert.equal(l1.edx & 0x1080, 0x1080);
  assert.equal(out.find((e) => e.function === 0x8000_0008)!.ebx, 0x001c_0004);
  assert.equal(out.find((e) => e.function === 0xd && e.index === 1)!.eax, 0xffff_fff1);
});

test('bits of the template that KVM did not keep are reported, leaf by leaf', () => {
  const t = parseCpuTemplate(TEMPLATE);
  const set = applyTemplateToCpuid([E(1, 0, 0, 0, 0, 0), E(7, 0, 0, 0b11)], t);
  assert.deepEqual(cpuidTemplateNotApplied(set, set, t), []);
  const got = structuredClone(set);
  got[0]!.ecx = 0xffff_ffff; // the host put its own bits back
  got[0]!.eax = 0x1234; // not a bit the template names: not reported
  assert.deepEqual(cpuidTemplateNotApplied(set, got, t), [
    "CPUID leaf 0x1 subleaf 0x0 ecx: the template's bits are 0x0 but this host's KVM keeps 0x40000000",
  ]);
  assert.match(
    cpuidTemplateNotApplied(set, [got[0]!], t).at(-1)!,
    /leaf 0x7 subleaf 0x0 ebx: .* keeps no such leaf/,
  );
});

test('hostile templates: random shapes and strings give a ConfigError or a template, never a crash', () => {
  let seed = 0x9e37_79b9;
  const rnd = () => {
    seed = (Math.imul(seed ^ (seed >>> 15), 0x2c1b_3c6d) + 0x6d2b_79f5) >>> 0;
    return seed / 2 ** 32;
  };
  const pick = <T>(xs: T[]): T => xs[Math.floor(rnd() * xs.length)]!;
  const str = () =>
    pick(['0b', '0x', '', '!', '_', 'x', '1', '0', '9', 'é', ' ', '-'])
      .concat(pick(['', '01x_', '1'.repeat(70), 'ffff_ffff', '121', '0b1x']))
      .slice(0, 80);
  const value = (depth: number): unknown => {
    const k = Math.floor(rnd() * (depth > 2 ? 5 : 8));
    if (k === 0) return str();
    if (k === 1) return Math.floor(rnd() * 20) - 5;
    if (k === 2) return null;
    if (k === 3) return rnd() < 0.5;
    if (k === 4) return 1.5;
    if (k === 5) return Array.from({ length: Math.floor(rnd() * 3) }, () => value(depth + 1));
    const keys = ['leaf', 'subleaf', 'flags', 'modifiers', 'register', 'bitmap', 'addr', 'x'];
    return Object.fromEntries(keys.filter(() => rnd() < 0.6).map((k2) => [k2, value(depth + 1)]));
  };
  let accepted = 0;
  for (let i = 0; i < 3000; i++) {
    const t: Record<string, unknown> = {};
    for (const k of ['kvm_capabilities', 'cpuid_modifiers', 'msr_modifiers', 'reg_modifiers'])
      if (rnd() < 0.5) t[k] = value(0);
    try {
      const parsed = parseCpuTemplate(t);
      accepted++;
      assert.deepEqual(parseCpuTemplate(wireCpuTemplate(parsed)), parsed);
    } catch (e) {
      assert.ok(e instanceof ConfigError, `${(e as Error).stack} for ${JSON.stringify(t)}`);
    }
  }
  assert.ok(accepted > 0);
});
