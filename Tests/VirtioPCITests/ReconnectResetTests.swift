import Foundation
import VirtioCore
import VirtioPCI
import VirtioTestSupport
import XCTest

/// With a reconnect policy, DEVICE_NEEDS_RESET (§2.1.2) or a device that reset itself is repaired
/// the way the spec asks: the driver resets the device — before any queue owner takes its
/// buffers back — and initialises it again with the features negotiated before; every ring is
/// given again from position 0 and the device is started. A function that reads all-ones is gone.
final class ReconnectResetTests: XCTestCase {
    let address = PCIAddress("0000:00:04.0")!

    func device(_ bar: FakeModernBAR) throws -> (VirtioPCITransport, VirtioDevice<SplitVirtqueue>) {
        let t = try VirtioPCITransport(address: address, interface: try bar.interface(), deviceType: 1, translate: { va, _ in va })
        let n = try VirtioNegotiation(offered: t.deviceFeatures, required: [.version1], wanted: [.inOrder], ring: .split, device: "test")
        let d = try VirtioDevice<SplitVirtqueue>(transport: t, negotiation: n, queues: [VirtqueueSpec(index: 0, size: 64), VirtqueueSpec(index: 1, size: 64)],
                                                 memory: HeapDMAAllocator())
        try d.start()
        return (t, d)
    }

    func waitUntil(_ what: String, timeout: Double = 5, _ cond: () -> Bool) {
        let end = Date().addingTimeInterval(timeout)
        while !cond() {
            if Date() > end { XCTFail("timed out waiting for \(what)"); return }
            usleep(1000)
        }
    }

    func testNeedsResetIsRepairedByAResetAndReinitialisation() throws {
        for lost in [UInt8(0x4f), 0x00] {
            let bar = FakeModernBAR(features: VirtioFeatures([.version1, .inOrder]).rawValue)
            let (t, d) = try device(bar)
            var rx = d.makeQueue(0), tx = d.makeQueue(1)
            d.enableReconnect(ReconnectPolicy(timeout: 5))
            rx.addBurst(count: 4, deviceWritable: true) { i in (UInt64(0x10000 * (i + 1)), 2048, UnsafeMutableRawPointer(bitPattern: i + 1)) }
            _ = rx.publish()
            XCTAssertEqual(bar.status, 0x0f)
            XCTAssertFalse(d.mayResetRings, "nothing to reset while the device runs")
            bar.statusHistory = []
            bar.status = lost
            XCTAssertFalse(d.isLinkUp, "the status read takes the link down")
            // The device is reset before the owners may take their buffers back.
            waitUntil("the device reset") { d.mayResetRings }
            XCTAssertTrue(bar.statusHistory.contains(0), "reset")
            XCTAssertEqual(rx.reclaimAll { _ in }, 4)
            _ = tx.reclaimAll { _ in }
            rx.restart(at: SplitVirtqueue.resetBase); tx.restart(at: SplitVirtqueue.resetBase)
            XCTAssertEqual(bar.status, 3, "initialised to DRIVER, waiting for the rings")
            d.ringsReset([0, 1])
            waitUntil("the link to come back") { d.link.isUp }
            XCTAssertEqual(Array(bar.statusHistory.suffix(5)), [0, 1, 3, 0x0b, 0x0f], "reset, ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK")
            XCTAssertEqual(bar.driverFeatures, VirtioFeatures([.version1, .inOrder]).rawValue, "the features negotiated before")
            XCTAssertEqual(bar.queues.map(\.enable), [1, 1])
            XCTAssertTrue(t.isConnected)
            XCTAssertEqual(d.outages.map(\.recovered), [true])
            d.stop()
        }
    }

    func testAllOnesIsNotRepaired() throws {
        let bar = FakeModernBAR(features: VirtioFeatures([.version1]).rawValue)
        let (t, d) = try device(bar)
        d.enableReconnect(ReconnectPolicy(timeout: 5))
        bar.status = 0xff
        XCTAssertFalse(d.isLinkUp)
        XCTAssertFalse(t.canReconnect)
        waitUntil("the failure") { d.reconnectFailure != nil }
        XCTAssertTrue(d.reconnectFailure?.description.contains("is gone") == true, "\(String(describing: d.reconnectFailure))")
        XCTAssertEqual(d.reconnectFailure?.exitCode, 2)
    }
}
