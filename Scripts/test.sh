#!/usr/bin/env bash
# Sets the machine up (Scripts/setup.sh), builds, and runs every test. The integration tests start
# their own dpdk-testpmd vhost-user peers (CPU 0) and run the vio binary (CPU 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash Scripts/setup.sh
swift build --build-tests
# The Hummingbird example (a separate package: Hummingbird stays out of the library graph); the
# integration tests serve it on the dataplane. VIO_REQUIRE_EXAMPLES makes a missing binary a failure.
swift build --package-path Examples/HummingbirdOnDataplane
export VIO_REQUIRE_EXAMPLES=1
swift test --skip-build --disable-swift-testing "$@"
