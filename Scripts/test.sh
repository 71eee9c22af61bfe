#!/usr/bin/env bash
# Sets the machine up (Scripts/setup.sh), builds, and runs every test. The integration tests start
# their own dpdk-testpmd vhost-user peers (CPU 0) and run the vio binary (CPU 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash Scripts/setup.sh
swift build --build-tests
swift test --skip-build --disable-swift-testing "$@"
