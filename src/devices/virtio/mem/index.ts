/** virtio-mem's names the VMM uses (config space offsets, encoding). */
export { MEM_CFG } from './mem.js';
export { u64 } from './descriptor.js';
export { savedPluggedBlocks } from './mem.js';
