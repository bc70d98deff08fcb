/**
 * The host side's front door (Firecracker's protocol): host programs dial the device's Unix
 * socket `${uds}`, write "CONNECT <port>\n", and become a connection to guest port <port> once
 * the guest accepts (the muxer writes "OK <hostport>\n" then). Anything else is refused by
 * closing the socket. Lines are read one byte at a time so that nothing after the newline is
 * consumed: those bytes are the first data for the guest.
 */
import type { VsockCounters, VsockHost, VsockReport } from './host.js';
import { parseConnectLine } from './packet.js';

const MAX_CONNECT_LINE = 32;

interface Handshake {
  fd: number;
  /** The line so far (without the newline). */
  line: string;
}

export class HostListener {
  /** Accepted sockets still sending their CONNECT line, by fd. */
  private readonly handshakes = new Map<number, Handshake>();

  constructor(
    private readonly host: VsockHost,
    private readonly counters: VsockCounters,
    private readonly report: VsockReport,
    /** A complete, valid CONNECT line: the socket now belongs to the caller. */
    private readonly connect: (fd: number, port: number) => void,
  ) {}

  handles(fd: number): boolean {
    return this.handshakes.has(fd);
  }

  /** The listening socket is readable: take new host connections (`open`: a driver is there). */
  accept(open: boolean): void {
    for (;;) {
      let fd: number;
      try {
        fd = this.host.accept();
      } catch (e) {
        this.report.logOnce('accept', `accept failed: ${(e as Error).message}`);
        return;
      }
      if (fd < 0) return;
      if (!open) {
        this.host.close(fd); // no driver: nobody could accept
        continue;
      }
      this.handshakes.set(fd, { fd, line: '' });
      this.host.watch(fd, true, false);
    }
  }

  /** A handshaking socket is readable (or hung up): read what there is of its line. */
  onReadable(fd: number, open: boolean): void {
    const hs = this.handshakes.get(fd);
    if (!hs) return;
    const b = new Uint8Array(1);
    for (;;) {
      let n: number;
      try {
        n = this.host.read(hs.fd, [b]);
      } catch {
        n = 0;
      }
      if (n < 0) return;
      if (n === 0 || hs.line.length >= MAX_CONNECT_LINE) return this.refuse(hs, 'EOF');
      if (b[0] === 0x0a) break;
      hs.line += String.fromCharCode(b[0]!);
    }
    this.handshakes.delete(hs.fd);
    const port = parseConnectLine(hs.line.replace(/\r$/, ''));
    if (port === undefined || !open) return this.refuse(hs, hs.line);
    this.connect(hs.fd, port);
  }

  /** The driver went away: handshakes in progress are dropped. */
  closeAll(): void {
    for (const hs of this.handshakes.values()) this.host.close(hs.fd);
    this.handshakes.clear();
  }

  private refuse(hs: Handshake, line: string): void {
    this.counters.badHandshakes++;
    this.report.logOnce('handshake', `bad host handshake ${JSON.stringify(line.slice(0, 40))}`);
    this.handshakes.delete(hs.fd);
    this.host.close(hs.fd);
  }
}
