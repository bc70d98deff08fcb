/**
 * Findings the fuzzer reproduces in code other helpers own (see FINDINGS.md): the smoke test
 * in CI tolerates these (and says so) and fails on anything else. Remove an entry once its
 * bug is fixed; an entry nothing matches any more is reported by the smoke as stale.
 */
export interface KnownFinding {
  id: string;
  /** Matches the failure message. */
  pattern: RegExp;
  summary: string;
}

export const KNOWN: KnownFinding[] = [
  {
    id: 'NET-RX-IOV',
    pattern: /virtio-net: busy loop: fd \d+ \(tap/,
    summary:
      'virtio-net RX chain of more than 1023 buffers: readv (IOV_MAX) throws, the chain is held, the TAP stays watched: busy loop',
  },
  {
    id: 'NET-TX-TOCTOU',
    pattern: /virtio-net TX: a frame reached the TAP with a header the device refuses/,
    summary: 'virtio-net TX header validated on a copy, live guest memory sent (racing vCPU)',
  },
  {
    id: 'VSOCK-ACCEPT-EMFILE',
    pattern: /virtio-vsock: busy loop: fd \d+ \(listen/,
    summary: 'vsock listener: accept failing (EMFILE/ENFILE) leaves the socket readable: busy loop',
  },
  {
    id: 'VSOCK-HOST-CONNECTING',
    pattern: /virtio-vsock: busy loop: fd \d+ \(socket/,
    summary:
      'vsock host-initiated connection waiting for the guest: its socket stays watched for reading (from the handshake), unread data/EOF/error: busy loop until the guest answers or 10 s',
  },
  {
    id: 'VSOCK-UNBOUNDED',
    pattern: /virtio-vsock: heap grew/,
    summary:
      'vsock: replies (RST) to packets for no connection queue without limit while the guest posts no RX buffers (and 1-byte segments to a peer that does not read cost ~200 B each)',
  },
];

export function knownFinding(message: string): KnownFinding | undefined {
  return KNOWN.find((k) => k.pattern.test(message));
}
