import { GuestMemoryError } from '../util/errors.js';

declare const guestAddressBrand: unique symbol;
/**
 * A guest-physical address. Built only through `guestAddress()`, which rejects anything that is
 * not a non-negative safe integer: a 64-bit guest value >= 2^53 cannot be represented exactly in
 * a JS number and is never a valid address of ours (guest RAM is far below 2^53).
 */
export type GuestAddress = number & { readonly [guestAddressBrand]: true };

export const MAX_GUEST_ADDRESS = Number.MAX_SAFE_INTEGER;

export function isGuestAddress(v: number): v is GuestAddress {
  return Number.isSafeInteger(v) && v >= 0;
}

export function guestAddress(v: number | bigint): GuestAddress {
  const n =
    typeof v === 'bigint' ? (v <= BigInt(MAX_GUEST_ADDRESS) && v >= 0n ? Number(v) : -1) : v;
  if (!isGuestAddress(n)) throw new GuestMemoryError(`invalid guest address ${v.toString()}`);
  return n;
}

/** `a + off`, or undefined when the sum is not a valid address (overflow past 2^53). */
export function checkedAdd(a: GuestAddress, off: number): GuestAddress | undefined {
  const s = a + off;
  return Number.isSafeInteger(off) && isGuestAddress(s) ? s : undefined;
}
