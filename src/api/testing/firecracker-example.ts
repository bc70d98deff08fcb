/**
 * Test-only: Firecracker's example configuration file (its tests/framework/vm_config.json:
 * every section present, unused ones null or [], optional fields null), in our words, for the
 * given kernel and root disk. Shared by the config-file unit tests and the host test that boots it.
 */
export function firecrackerExampleConfig(kernel: string, disk: string) {
  return {
    'boot-source': {
      kernel_image_path: kernel,
      boot_args: 'console=ttyS0 reboot=k panic=1',
      initrd_path: null,
    },
    drives: [
      {
        drive_id: 'rootfs',
        partuuid: null,
        is_root_device: true,
        cache_type: 'Unsafe',
        is_read_only: false,
        path_on_host: disk,
        io_engine: 'Sync',
        rate_limiter: null,
        socket: null,
      },
    ],
    'machine-config': {
      vcpu_count: 2,
      mem_size_mib: 1024,
      smt: false,
      track_dirty_pages: false,
      huge_pages: 'None',
    },
    'cpu-config': null,
    balloon: null,
    'network-interfaces': [],
    vsock: null,
    logger: null,
    metrics: null,
    'mmds-config': null,
    entropy: null,
    pmem: [],
    'memory-hotplug': null,
  };
}
