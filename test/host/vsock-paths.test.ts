/**
 * Where guest vsock connections go (issue 14, least privilege): `<uds>_<port>` is reached
 * without following a symbolic link, and a uds_path whose directory others can write is refused
 * at configuration time. Real native Unix sockets (the shim), no /dev/kvm needed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, readdirSync, rmSync, statSync, symlinkSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { native } from '../../src/kvm/native.js';
import {
  connectNoFollow,
  listenVsock,
  removeSocket,
  unsafeSocketDirectory,
  VSOCK_SOCKET_MODE,
} from '../../src/devices/virtio/vsock/unix-host.js';
import { ConfigError } from '../../src/util/errors.js';

const n = native();

/** A listening socket that counts the connections it gets. */
async function listener(path: string): Promise<{ server: Server; accepted: () => number }> {
  let count = 0;
  const server = createServer((s) => {
    count++;
    s.destroy();
  });
  await new Promise<void>((ok) => server.listen(path, ok));
  return { server, accepted: () => count };
}

const settle = () => new Promise((r) => setTimeout(r, 100));

test('a symlink at <uds>_<port> is not followed; a real socket there is reached', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-vsock-'));
  const elsewhere = mkdtempSync(join(tmpdir(), 'tv-victim-'));
  try {
    // Some other service's socket, and a link to it where a guest connection would go.
    const victim = await listener(join(elsewhere, 'service.sock'));
    symlinkSync(join(elsewhere, 'service.sock'), join(dir, 'v.sock_52'));
    const fd = n.unixSocket();
    try {
      assert.throws(
        () => connectNoFollow(n, fd, join(dir, 'v.sock_52')),
        /v\.sock_52: a symbolic link \(not followed\)/,
      );
    } finally {
      n.close(fd);
    }
    await settle();
    assert.equal(victim.accepted(), 0, 'the linked socket got no connection');

    const real = await listener(join(dir, 'v.sock_53'));
    const fd2 = n.unixSocket();
    try {
      assert.equal(connectNoFollow(n, fd2, join(dir, 'v.sock_53')), 0);
    } finally {
      n.close(fd2);
    }
    await settle();
    assert.equal(real.accepted(), 1);
    const fd3 = n.unixSocket();
    try {
      assert.throws(() => connectNoFollow(n, fd3, join(dir, 'v.sock_54')), /ENOENT/);
    } finally {
      n.close(fd3);
    }
    victim.server.close();
    real.server.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
    rmSync(elsewhere, { recursive: true, force: true });
  }
});

test('uds_path in a directory others can write is refused at configuration time', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-vsock-'));
  try {
    for (const mode of [0o777, 0o1777, 0o770]) {
      chmodSync(dir, mode);
      assert.match(unsafeSocketDirectory(dir) ?? '', /is writable by (its group|others)/);
      assert.throws(
        () => listenVsock(n, 3, join(dir, 'v.sock')),
        (e: unknown) =>
          e instanceof ConfigError && /uds_path's directory .* is writable by/.test(e.message),
      );
    }
    chmodSync(dir, 0o755);
    const old = process.umask(0);
    let l;
    try {
      l = listenVsock(n, 3, join(dir, 'v.sock'));
    } finally {
      process.umask(old);
    }
    // The listening socket host programs connect to: 0600 whatever the umask, nothing left over.
    assert.equal(statSync(l.path).mode & 0o777, VSOCK_SOCKET_MODE);
    assert.deepEqual(readdirSync(dir), ['v.sock']);
    n.close(l.fd);
    removeSocket(l.path);
    assert.throws(() => listenVsock(n, 3, '/tmp/v.sock'), /\/tmp is writable by others/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
