/**
 * virtio-vsock host -> guest on the host, no KVM (issue 17): the CPU our RX path spends per 4 KiB
 * packet, the way a Linux guest posts buffers (64 per round, 4 KiB of data each), over the mock
 * driver and a fake host whose socket always has data. What it leaves out: the loop, the socket's
 * read system call, the interrupt's eventfd. Prints CPU per packet and young-generation
 * collections per 1,000 packets (a proxy for what each packet allocates).
 *
 *   node dist/bench/vsock-rx.js [--rounds N] [--runs N]
 */
import { parseArgs } from 'node:util';
import { setup } from '../src/devices/virtio/testing/vsock.js';
import { countMinorGcs } from './common.js';
import {
  OP_CREDIT_UPDATE,
  OP_REQUEST,
  VSOCK_HDR_SIZE,
} from '../src/devices/virtio/vsock/packet.js';
import { BUF_ALLOC, RX_QUEUE } from '../src/devices/virtio/vsock/vsock.js';

const PER_ROUND = 64;

async function once(rounds: number): Promise<{ usPerPacket: number; minorGcsPer1000: number }> {
  const t = setup();
  t.host.listeners.add('/tmp/v.sock_80');
  t.addRx(1);
  t.send({ op: OP_REQUEST, bufAlloc: BUF_ALLOC });
  t.received();
  const fd = [...t.host.socks.keys()][0]!;
  const src = new Uint8Array(1 << 20).fill(7);
  // A socket that always has data: each read fills what it is given.
  t.host.read = (_fd, bufs) => {
    let n = 0;
    for (const b of bufs) {
      b.set(src.subarray(0, b.length));
      n += b.length;
    }
    return n;
  };
  const size = VSOCK_HDR_SIZE + 4096;
  const addrs = Array.from({ length: PER_ROUND }, () => t.h.alloc.alloc(size));
  let forwarded = 0;
  const round = (): number => {
    for (const a of addrs) t.rx.addChain([{ addr: a, len: size, write: true }]);
    t.h.kick(RX_QUEUE);
    t.dev.onSocket(fd, true, false, false);
    t.host.drainYields();
    const used = t.rx.takeUsed();
    for (const u of used) forwarded += u.len - VSOCK_HDR_SIZE;
    // The guest's credit update for what it consumed, as a Linux guest sends it.
    t.send({ op: OP_CREDIT_UPDATE, bufAlloc: BUF_ALLOC, fwdCnt: forwarded >>> 0 });
    t.tx.takeUsed();
    return used.length;
  };
  for (let i = 0; i < Math.min(2000, rounds); i++) round(); // warm
  const gcs = countMinorGcs();
  const c0 = process.cpuUsage();
  let packets = 0;
  for (let i = 0; i < rounds; i++) packets += round();
  const c = process.cpuUsage(c0);
  const minor = await gcs.stop();
  return {
    usPerPacket: (c.user + c.system) / packets,
    minorGcsPer1000: (minor * 1000) / packets,
  };
}

const { values } = parseArgs({
  options: { rounds: { type: 'string' }, runs: { type: 'string' } },
});
const rounds = Number(values.rounds ?? 3000);
const runs = Number(values.runs ?? 3);
if (!Number.isInteger(rounds) || rounds < 1) throw new Error('--rounds: a positive integer');
if (!Number.isInteger(runs) || runs < 1) throw new Error('--runs: a positive integer');
for (let r = 0; r < runs; r++) {
  const x = await once(rounds);
  console.log(
    `vsock RX, ${PER_ROUND} 4 KiB packets a round, ${rounds} rounds: ${x.usPerPacket.toFixed(2)} us CPU per packet (the mock driver's included), ${x.minorGcsPer1000.toFixed(2)} young-generation collections per 1,000 packets`,
  );
}
