/** Every fuzz target, in the order `npm run fuzz` runs them. */
import type { Target } from '../core.js';
import { apiHttpTarget, apiTarget } from './api.js';
import { balloonTarget } from './balloon.js';
import { blockTarget } from './block.js';
import { i8042Target, legacyBusTarget, rtcTarget, serialTarget } from './legacy.js';
import { bzImageTarget, elfTarget } from './loader.js';
import { memTarget } from './mem.js';
import { mmdsTarget } from './mmds.js';
import { mmioTarget } from './mmio.js';
import { netTarget } from './net.js';
import { queueTarget } from './queue.js';
import { racing } from './race.js';
import { vsockTarget } from './vsock.js';

export const TARGETS: Target[] = [
  queueTarget,
  blockTarget,
  netTarget,
  mmdsTarget,
  vsockTarget,
  balloonTarget,
  memTarget,
  mmioTarget,
  serialTarget,
  i8042Target,
  rtcTarget,
  legacyBusTarget,
  bzImageTarget,
  elfTarget,
  apiTarget,
  apiHttpTarget,
  racing(queueTarget, 25_000),
  racing(blockTarget, 25_000),
  racing(netTarget, 25_000),
  racing(vsockTarget, 25_000),
  racing(balloonTarget, 25_000),
  racing(memTarget, 25_000),
];
