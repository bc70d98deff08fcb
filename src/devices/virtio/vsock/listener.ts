/**
 * The host side's front door (Firecracker's protocol): host programs dial the device's Unix
 * socket `${uds}`, write "CONNECT <port>\n", and become a connection to guest port <port> once
 * the guest accepts (the muxer writes "OK <hostport>\n" then). Anything else is refused by
 * closing the socket. Lines are read one byte at a time so that nothing after the newline is
 * consumed: those bytes are the first data for the guest.
 *
 * Budgets (host programs are untrusted too): at most MAX_PENDING_HANDSHAKES host sockets may be
 * sending their line or waiting for the guest's answer at once. At that many the listener stops
 * accepting (the rest wait in the kernel's listen backlog, which bounds them; counted as
 * accepts_deferred) and looks again every FULL_RECHECK_MS and whenever a handshake ends; the
 * muxer still closes a connection over the cap if one gets through (handshakes_refused). Each
 * socket gets HANDSHAKE_TIMEOUT_MS to send its line, and one wake-up accepts at most
 * ACCEPT_BATCH sockets.
 * When accept fails (EMFILE, ENFILE: the process is out of descriptors) the listening socket,
 * which stays readable, is unwatched and re-armed by a timer that backs off from
 * ACCEPT_BACKOFF_MIN_MS to ACCEPT_BACKOFF_MAX_MS: no wake-up without progress.
 */
import type { VsockCounters, VsockHost, VsockReport } from './host.js';
import { parseConnectLine } from './packet.js';

const MAX_CONNECT_LINE = 32;
/** Host sockets sending their CONNECT line or waiting for the guest's answer, at most. */
export const MAX_PENDING_HANDSHAKES = 64;
/** A host socket has this long to send a complete CONNECT line. */
export const HANDSHAKE_TIMEOUT_MS = 5_000;
/** Sockets accepted per wake-up of the listener (it stays readable if there are more). */
export const ACCEPT_BATCH = 64;
/** accept failed: the listener is unwatched this long, doubling up to the maximum. */
export const ACCEPT_BACKOFF_MIN_MS = 100;
export const ACCEPT_BACKOFF_MAX_MS = 5_000;
/** While full (MAX_PENDING_HANDSHAKES), the listener looks again this often. */
export const FULL_RECHECK_MS = 50;

interface Handshake {
  fd: number;
  /** The line so far (without the newline). */
  line: string;
  cancelTimer: () => void;
}

export class HostListener {
  /** Accepted sockets still sending their CONNECT line, by fd. */
  private readonly handshakes = new Map<number, Handshake>();
  /** The next back-off after an accept failure; 0 while accept works. */
  private backoffMs = 0;
  private backingOff = false;
  /** Unwatched because MAX_PENDING_HANDSHAKES host sockets are handshaking or waiting. */
  private full = false;

  constructor(
    private readonly host: VsockHost,
    private readonly counters: VsockCounters,
    private readonly report: VsockReport,
    /** A complete, valid CONNECT line: the socket now belongs to the caller. */
    private readonly connect: (fd: number, port: number) => void,
    /** Host connections the caller has offered to the guest and not yet seen answered. */
    private readonly waitingForGuest: () => number = () => 0,
  ) {}

  private atCapacity(): boolean {
    return this.handshakes.size + this.waitingForGuest() >= MAX_PENDING_HANDSHAKES;
  }

  /** At capacity: stop accepting (the kernel's backlog holds the rest) and look again later. */
  private pauseFull(): void {
    if (this.full) return;
    this.full = true;
    this.counters.acceptsDeferred++;
    this.report.logOnce(
      'handshake-cap',
      `${MAX_PENDING_HANDSHAKES} host sockets are handshaking or waiting for the guest: new ones wait in the listen backlog`,
    );
    this.host.watchListener(false);
    const recheck = () => {
      if (!this.full) return;
      if (this.atCapacity()) {
        this.host.after(FULL_RECHECK_MS, recheck);
        return;
      }
      this.resumeFromFull();
    };
    this.host.after(FULL_RECHECK_MS, recheck);
  }

  private resumeFromFull(): void {
    if (!this.full) return;
    this.full = false;
    if (!this.backingOff) this.host.watchListener(true);
  }

  handles(fd: number): boolean {
    return this.handshakes.has(fd);
  }

  get pendingHandshakes(): number {
    return this.handshakes.size;
  }

  /** The listening socket is readable: take new host connections (`open`: a driver is there). */
  accept(open: boolean): void {
    if (this.backingOff || this.full) return; // a wake-up queued before we unwatched
    for (let i = 0; i < ACCEPT_BATCH; i++) {
      if (open && this.atCapacity()) return this.pauseFull();
      let fd: number;
      try {
        fd = this.host.accept();
      } catch (e) {
        this.backOff(e as Error);
        return;
      }
      this.backoffMs = 0;
      if (fd < 0) return;
      if (!open) {
        this.host.close(fd); // no driver: nobody could accept
        continue;
      }
      const cancelTimer = this.host.after(HANDSHAKE_TIMEOUT_MS, () => this.timedOut(fd));
      this.handshakes.set(fd, { fd, line: '', cancelTimer });
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
    this.drop(hs);
    const port = parseConnectLine(hs.line.replace(/\r$/, ''));
    if (port === undefined || !open) {
      this.counters.badHandshakes++;
      this.report.logOnce(
        'handshake',
        `bad host handshake ${JSON.stringify(hs.line.slice(0, 40))}`,
      );
      this.host.close(hs.fd);
      return;
    }
    this.connect(hs.fd, port);
  }

  /** The driver went away: handshakes in progress are dropped. */
  closeAll(): void {
    for (const hs of [...this.handshakes.values()]) {
      this.drop(hs);
      this.host.close(hs.fd);
    }
  }

  private drop(hs: Handshake): void {
    this.handshakes.delete(hs.fd);
    hs.cancelTimer();
    if (this.full && !this.atCapacity()) this.resumeFromFull();
  }

  private refuse(hs: Handshake, line: string): void {
    this.counters.badHandshakes++;
    this.report.logOnce('handshake', `bad host handshake ${JSON.stringify(line.slice(0, 40))}`);
    this.drop(hs);
    this.host.close(hs.fd);
  }

  private timedOut(fd: number): void {
    const hs = this.handshakes.get(fd);
    if (!hs) return;
    this.counters.handshakeTimeouts++;
    const m = `a host socket sent no complete CONNECT line within ${HANDSHAKE_TIMEOUT_MS} ms: closed`;
    this.report.logOnce('handshake-timeout', m);
    this.drop(hs);
    this.host.close(fd);
  }

  /** accept failed: stop watching the listener for a while (it would stay readable). */
  private backOff(e: Error): void {
    this.counters.acceptFails++;
    this.backoffMs = Math.min(
      ACCEPT_BACKOFF_MAX_MS,
      Math.max(ACCEPT_BACKOFF_MIN_MS, this.backoffMs * 2),
    );
    this.report.logOnce(
      'accept',
      `accept failed: ${e.message}; the listener is paused for ${this.backoffMs} ms, backing off up to ${ACCEPT_BACKOFF_MAX_MS} ms`,
    );
    this.backingOff = true;
    this.host.watchListener(false);
    this.host.after(this.backoffMs, () => {
      this.backingOff = false;
      this.host.watchListener(true);
    });
  }
}
