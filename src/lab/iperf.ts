/**
 * Reading iperf3's output (the in-lab network benchmark and the rate limiter test): the
 * receiver's figures, from the text summary of a client or from the JSON (-J) of the receiving
 * server.
 */

/** iperf3's receiver summary line (text output, `-f m`): Mbit/s. */
export function iperfMbit(text: string): number | undefined {
  const m = /([\d.]+) Mbits\/sec[^\n]*receiver/.exec(text);
  return m ? Number(m[1]) : undefined;
}

/** iperf3's receiver summary line (text output): MBytes transferred. */
export function iperfMBytes(text: string): number | undefined {
  const m = /([\d.]+) MBytes[^\n]*receiver/.exec(text);
  return m ? Number(m[1]) : undefined;
}

export interface ReceivedRate {
  /** Bytes per second over the intervals counted. */
  rate: number;
  /** Bytes and seconds of the intervals counted. */
  bytes: number;
  seconds: number;
  /** The whole test as the receiver saw it (iperf3's `end.sum_received`). */
  totalBytes: number;
  totalSeconds: number;
  /** Every interval's rate (bytes/s), the uncounted ones too: where a test stalled. */
  perInterval: number[];
}

interface IperfSum {
  start: number;
  end: number;
  seconds: number;
  bytes: number;
  omitted?: boolean;
}

/**
 * The receiving side's rate from the JSON of one test (`iperf3 -s -1 -J`, the server being the
 * receiver): the bytes of its per-second intervals that start at `skipSec` or later, over
 * their seconds. Skipping the first second leaves out TCP's slow start and a rate limiter's
 * initial burst (a token bucket starts full). A last interval shorter than half a second (the
 * test's tail) is left out too. Throws when the JSON has an error or no interval to count.
 */
export function iperfReceivedRate(json: string, skipSec = 1): ReceivedRate {
  const r = JSON.parse(json) as {
    error?: string;
    intervals?: Array<{ sum: IperfSum }>;
    end?: { sum_received?: IperfSum };
  };
  if (r.error) throw new Error(`iperf3: ${r.error}`);
  const all = (r.intervals ?? []).map((i) => i.sum);
  const counted = all.filter((s) => !s.omitted && s.start >= skipSec - 0.05 && s.seconds >= 0.5);
  const bytes = counted.reduce((a, s) => a + s.bytes, 0);
  const seconds = counted.reduce((a, s) => a + s.seconds, 0);
  if (!seconds) throw new Error(`iperf3: no interval from ${skipSec} s on: ${json.slice(0, 2000)}`);
  return {
    rate: bytes / seconds,
    bytes,
    seconds,
    totalBytes: r.end?.sum_received?.bytes ?? 0,
    totalSeconds: r.end?.sum_received?.seconds ?? 0,
    perInterval: all.map((s) => (s.seconds ? s.bytes / s.seconds : 0)),
  };
}
