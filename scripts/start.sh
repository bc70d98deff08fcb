#!/bin/bash
# README's first command: installs what is missing, builds the default guest, and boots it to
# an interactive shell (Ctrl-A x quits). Where this host's KVM cannot run stock kernels (PVM),
# it boots it inside the lab instead, which takes longer but is the same Typervisor.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for s in native/typervisor.c native/uncounted.cc native/binding.gyp; do [ native/build/Release/typervisor_native.node -nt $s ] || { npm run install --silent; break; }; done  # missing or older than its sources
[ -f dist/src/cli/main.js ] || npx tsc -p tsconfig.json
node dist/src/lab/guest-cli.js paths >/dev/null
if node -e 'import("./dist/src/kvm/detect.js").then(m => process.exit(m.detectKvm().canRunStockGuests ? 0 : 1))'; then
  exec ./bin/typervisor run "$@"
fi
echo "start: this host's KVM cannot run stock kernels; booting the guest inside the lab (about a minute)" >&2
node dist/src/lab/guest-cli.js build lab >/dev/null
exec node dist/src/lab/lab-cli.js -- ./bin/typervisor run "$@"
