/**
 * Racing-vCPU variants of the virtio targets: the same sessions, while a worker thread
 * rewrites the session's guest RAM (racer.ts). The driver-side oracles are off (the rings are
 * not the driver's any more); what must hold is what a device owes any guest: no exception, no
 * device-caught exception, no busy loop, bounded heap, and for virtio-net that every frame on
 * the TAP has a header the device accepts (checked is used).
 */
import type { Target } from '../core.js';
import { racerStores, startRacing, stopRacing } from '../racer.js';

export function racing(t: Target, cases: number): Target {
  return {
    name: `race-${t.name}`,
    what: `${t.name} with a racing vCPU rewriting guest RAM`,
    cases,
    session: t.session,
    heapLimitMiB: t.heapLimitMiB,
    async open(rng) {
      const s = await t.open(rng);
      if (!s.ram || !s.rig) throw new Error(`${t.name}: no guest RAM to race on`);
      s.rig.racing = true;
      startRacing(s.ram.sabs, rng.u32());
      const before = racerStores();
      return {
        ...s,
        stats: () => ({ ...s.stats?.(), racer_stores: racerStores() - before }),
        async close() {
          stopRacing();
          await s.close?.();
        },
      };
    },
  };
}
