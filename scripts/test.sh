#!/bin/bash
# The whole test run (README's test command, and CI through .ci/run): installs what is missing,
# builds, makes the guest images (cached in ~/.cache/typervisor), then runs every test suite
# in one node test runner: unit tests, the fuzz smoke run (fuzz/smoke.test.ts), host-KVM tests
# with tiny guests, API tests, and the lab tests (stock Linux guests under Typervisor on the
# lab's AMD-V KVM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for s in native/typervisor.c native/uncounted.cc native/binding.gyp; do [ native/build/Release/typervisor_native.node -nt $s ] || { npm run install --silent; break; }; done  # missing or older than its sources
npx tsc -p tsconfig.json
node scripts/bundle.mjs  # the per-thread bundles bin/ runs (after tsc: they are made from dist/)
node dist/src/lab/guest-cli.js build kernel initramfs lab rootfs >/dev/null
node scripts/run-tests.mjs src fuzz test/host test/api test/lab
