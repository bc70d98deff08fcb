/**
 * Cross-checks our tables with ACPICA's own disassembler (`iasl -d`, package acpica-tools): the
 * same parser family Linux uses. Skipped, saying so, when iasl is not installed.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { buildAcpiTables } from './index.js';

const haveIasl = !spawnSync('iasl', ['-v'], { encoding: 'utf8' }).error;
const skip = haveIasl
  ? false
  : 'iasl not found: install acpica-tools (apt-get install -y acpica-tools)';

function iasl(dir: string, args: string[]): string {
  const r = spawnSync('iasl', args, { cwd: dir, encoding: 'utf8', timeout: 20_000 });
  const out = `${r.stdout}\n${r.stderr}`;
  assert.equal(r.status, 0, `iasl ${args.join(' ')} failed:\n${out}`);
  // The summary line says "0 Errors, 0 Warnings"; any other mention is a real complaint.
  const complaints = out.replace(/\b0 Errors, 0 Warnings\b/, '');
  assert.doesNotMatch(complaints, /error|warning|invalid|incorrect/i, out);
  return out;
}

test('iasl -d decompiles every table cleanly and the DSDT recompiles', { skip }, () => {
  const built = buildAcpiTables({
    vcpus: 4,
    virtio: [
      { addr: 0xc000_1000, gsi: 5 },
      { addr: 0xc000_2000, gsi: 6 },
      { addr: 0xc000_3000, gsi: 7 },
    ],
  });
  assert.ok(built.ok);
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-acpi-'));
  try {
    const dsl: Record<string, string> = {};
    for (const t of built.value.tables) {
      if (t.signature === 'RSD PTR ') continue; // not an SDT; iasl -d only takes tables
      const file = `${t.signature.toLowerCase()}.dat`;
      writeFileSync(join(dir, file), t.bytes);
      iasl(dir, ['-d', file]);
      dsl[t.signature] = readFileSync(join(dir, `${t.signature.toLowerCase()}.dsl`), 'utf8');
      assert.doesNotMatch(dsl[t.signature]!, /incorrect|\*\*\*\*/i, `${t.signature}.dsl`);
    }
    const dsdt = dsl.DSDT!;
    assert.equal(dsdt.match(/"LNRO0005"/g)?.length, 3);
    assert.match(dsdt, /EisaId \("PNP0501"\)/);
    assert.match(dsdt, /EisaId \("PNP0303"\)/);
    assert.match(dsdt, /Name \(_S5, Package \(0x02\)/);
    assert.match(dsdt, /Memory32Fixed \(ReadWrite,\s+0xC0002000,\s+\/\/ Address Base\s+0x00001000/);
    assert.match(
      dsdt,
      /Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)\s+\{\s+0x00000007,/,
    );
    // VMGenID and its GED, as ACPICA reads them.
    assert.match(dsdt, /Device \(VGEN\)\s+\{\s+Name \(_HID, "VMGENCTR"\)/);
    assert.match(dsdt, /Name \(_CID, "VM_Gen_Counter"\)/);
    assert.match(dsdt, /Name \(ADDR, Package \(0x02\)\s+\{\s+0x000DFFF0,\s+Zero\s+\}/);
    assert.match(dsdt, /Device \(GED\)\s+\{\s+Name \(_HID, "ACPI0013"/);
    assert.match(dsdt, /Method \(_EVT, 1, Serialized\)/);
    assert.match(dsdt, /If \(\(Arg0 == 0x17\)\)\s+\{\s+Notify \(\\_SB\.VGEN, 0x80\)/);
    assert.match(dsl.FACP!, /Hardware Reduced \(V5\) : 1/);
    assert.match(dsl.FACP!, /Reset Register Supported \(V2\) : 1/);
    assert.match(dsl.FACP!, /Address : 00000000FEB00100/);
    assert.equal(dsl.APIC!.match(/\[Processor Local APIC\]/g)?.length, 4);
    assert.match(dsl.APIC!, /\[I\/O APIC\]/);
    // Recompiling the decompiled DSDT proves the AML is well formed, not just parseable.
    // iasl's compiler (not the AML grammar, nor Linux) wants an ACPI id's last four characters
    // hex; "VMGENCTR" is Firecracker's _HID and what Linux's vmgenid driver matches, so only the
    // recompiled copy takes another id.
    writeFileSync(join(dir, 'round.dsl'), dsdt.replace('"VMGENCTR"', '"VMGE0000"'));
    assert.match(iasl(dir, ['round.dsl']), /0 Errors/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
