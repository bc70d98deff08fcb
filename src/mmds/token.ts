/**
 * MMDS V2 session tokens (PUT /latest/api/token). A token is self-checking: a nonce and its
 * expiry, MACed with a per-VM key (HMAC-SHA256, cut to 16 bytes), so the responder keeps no
 * table of issued tokens (nothing for a guest to fill) and a token cannot be forged or its TTL
 * stretched. The key comes from the main thread (random per VM); the clock is the monotonic one.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { monoMs } from '../util/clock.js';

export const TOKEN_TTL_MIN = 1;
export const TOKEN_TTL_MAX = 21_600;
/** A token header longer than this is not one of ours: refused before decoding. */
export const TOKEN_MAX_CHARS = 128;
const MAC_BYTES = 16;
const BODY_BYTES = 16; // nonce u64 + expiry (ms, u64)

export class TokenAuthority {
  private nonce = 0n;

  constructor(
    private readonly key: Uint8Array,
    private readonly now: () => number = () => monoMs(),
  ) {}

  /** A token valid for `ttlSeconds` (1..21600: the caller checked). */
  issue(ttlSeconds: number): string {
    const body = Buffer.alloc(BODY_BYTES);
    body.writeBigUInt64BE(++this.nonce, 0);
    body.writeBigUInt64BE(BigInt(Math.ceil(this.now() + ttlSeconds * 1000)), 8);
    return Buffer.concat([body, this.mac(body)]).toString('base64url');
  }

  /** The token is ours and has not expired. */
  valid(token: string): boolean {
    if (token.length === 0 || token.length > TOKEN_MAX_CHARS || !/^[A-Za-z0-9_-]+$/.test(token))
      return false;
    const raw = Buffer.from(token, 'base64url');
    if (raw.length !== BODY_BYTES + MAC_BYTES) return false;
    const body = raw.subarray(0, BODY_BYTES);
    if (!timingSafeEqual(raw.subarray(BODY_BYTES), this.mac(body))) return false;
    return Number(body.readBigUInt64BE(8)) > this.now();
  }

  private mac(body: Uint8Array): Buffer {
    return createHmac('sha256', this.key).update(body).digest().subarray(0, MAC_BYTES);
  }
}
