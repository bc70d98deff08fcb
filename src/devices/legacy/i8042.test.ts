import { test } from 'node:test';
import assert from 'node:assert/strict';
import { I8042, I8042_COMMAND_OFFSET as CMD, I8042_DATA_OFFSET as DATA } from './i8042.js';

function controller() {
  let irqs = 0;
  let resets = 0;
  const state = I8042.createState();
  const dev = new I8042(state, {
    irq: { trigger: () => void irqs++ },
    onReset: () => void resets++,
  });
  const rd = (off: number) => {
    const d = new Uint8Array(1);
    dev.read(off, d);
    return d[0]!;
  };
  const wr = (off: number, v: number) => dev.write(off, Uint8Array.of(v));
  /** An i8042_command(): command, optional parameter, polled reply. */
  const command = (cmd: number, param?: number): number | undefined => {
    wr(CMD, cmd);
    if (param !== undefined) wr(DATA, param);
    return rd(CMD) & 0x01 ? rd(DATA) : undefined;
  };
  return { dev, state, rd, wr, command, irqs: () => irqs, resets: () => resets };
}

test('0xFE on the command port resets; so does the output port with bit 0 clear', () => {
  const { dev, wr, command, resets } = controller();
  wr(CMD, 0xfe);
  assert.equal(resets(), 1);
  command(0xd1, 0xdf); // A20 on, reset line high: no reset
  assert.equal(resets(), 1);
  assert.equal(command(0xd0)! & 0x03, 0x03);
  command(0xd1, 0xde);
  assert.equal(resets(), 2);
  assert.equal(dev.stats().resets, 2);
});

test('controller self-test, interface test, command byte', () => {
  const { rd, command } = controller();
  assert.equal(command(0xaa), 0x55);
  assert.equal(rd(CMD) & 0x04, 0x04, 'system flag');
  assert.equal(command(0xab), 0x00);
  const ctr = command(0x20)!;
  assert.equal(ctr & 0x40, 0x40, 'translation on at power-on');
  assert.equal(command(0x60, 0x47), undefined);
  assert.equal(command(0x20), 0x47);
  command(0xad);
  assert.equal(command(0x20)! & 0x10, 0x10);
  command(0xae);
  assert.equal(command(0x20)! & 0x10, 0);
});

test('Linux i8042 + atkbd probe finds a keyboard and no AUX port', () => {
  const { rd, wr, command, irqs } = controller();
  // i8042_controller_check / flush.
  assert.equal(rd(CMD) & 0x01, 0);
  assert.equal(command(0xaa), 0x55);
  // i8042_controller_init: stable CTR, then keyboard disabled and its interrupt off.
  let ctr = command(0x20)!;
  assert.equal(command(0x20), ctr);
  assert.equal(rd(CMD) & 0x10, 0x10, 'not key-locked');
  ctr = (ctr | 0x10) & ~0x01;
  command(0x60, ctr);
  // i8042_check_aux: loop test answers without the AUX-data bit, AUX test reports an error.
  wr(CMD, 0xd3);
  wr(DATA, 0x5a);
  const st = rd(CMD);
  assert.equal(st & 0x01, 0x01);
  assert.equal(st & 0x20, 0, 'no AUX data: Linux gives up on AUX at once');
  rd(DATA);
  const auxTest = command(0xa9)!;
  assert.ok(auxTest !== 0 && auxTest !== 0xfa && auxTest !== 0xff);
  // i8042_enable_kbd_port.
  ctr = (ctr & ~0x10) | 0x01;
  command(0x60, ctr);
  // atkbd_probe: each byte arrives with an interrupt.
  const kbd = (...bytes: number[]) => {
    const got: number[] = [];
    for (const b of bytes) {
      const before = irqs();
      wr(DATA, b);
      while (rd(CMD) & 0x01) got.push(rd(DATA));
      assert.ok(irqs() > before, 'keyboard replies raise IRQ 1');
    }
    return got;
  };
  assert.deepEqual(kbd(0xf5), [0xfa]);
  assert.deepEqual(kbd(0xf2), [0xfa, 0xab, 0x41], 'translated MF2 id');
  assert.deepEqual(kbd(0xed, 0x00), [0xfa, 0xfa]);
  assert.deepEqual(kbd(0xf3, 0x00), [0xfa, 0xfa]);
  assert.deepEqual(kbd(0xf4), [0xfa]);
  assert.deepEqual(kbd(0xff), [0xfa, 0xaa]);
  assert.deepEqual(kbd(0xee), [0xee]);
});

test('Ctrl-Alt-Del arrives in set 1, one byte and one IRQ at a time', () => {
  const { state, rd, irqs } = controller();
  // The control plane uses its own object over the same state.
  let planeIrqs = 0;
  const plane = new I8042(state, { irq: { trigger: () => void planeIrqs++ }, onReset: () => {} });
  assert.equal(plane.sendCtrlAltDel(), true);
  assert.equal(planeIrqs, 1, 'first byte raised IRQ 1');
  const got: number[] = [];
  while (rd(CMD) & 0x01) got.push(rd(DATA));
  assert.deepEqual(got, [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
  assert.equal(irqs(), 7, 'one more IRQ per byte after each read');
});

test('Ctrl-Alt-Del without translation is set 2; a full buffer refuses it', () => {
  const { dev, rd, wr, command } = controller();
  command(0x60, 0x05); // KBDINT | SYS, no XLATE
  command(0xad); // keyboard port disabled: bytes wait in the keyboard
  assert.equal(dev.sendCtrlAltDel(), true);
  assert.equal(dev.sendCtrlAltDel(), false, '16-byte keyboard buffer');
  assert.equal(rd(CMD) & 0x01, 0);
  wr(CMD, 0xae);
  const got: number[] = [];
  while (rd(CMD) & 0x01) got.push(rd(DATA));
  assert.deepEqual(got, [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]);
});

test('ports 0x61-0x63 and wide accesses are not ours', () => {
  const { dev, rd } = controller();
  assert.equal(rd(1), 0xff);
  dev.write(2, Uint8Array.of(0));
  dev.read(DATA, new Uint8Array(2));
  assert.equal(dev.stats().unknownAccesses, 3);
});
