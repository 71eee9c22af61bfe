import FuzzSupport
import VirtioCore
import VirtioTestSupport

// split-used: a SplitVirtqueue (in order or out of order, 4/8/16 entries, optionally with
// indirect tables and EVENT_IDX) whose device is the fuzz input. The input is a script of steps:
// driver posts, publishes and harvests interleaved with device actions — legitimate completions
// (in order, out of order, one entry for a batch) and arbitrary writes of used entries, the used
// index and the event fields. QueueShadow checks every result (see its comment).
//
// Input: byte 0 = configuration, then one step per byte (plus the step's operands).

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    var input = FuzzInput(data, size)
    runSplit(&input)
    return 0
}

func runSplit(_ input: inout FuzzInput) {
    let cfg = input.u8()
    let inOrder = cfg & 1 != 0
    let eventIndex = cfg & 2 != 0
    let size = [8, 4, 16, 8][Int(cfg >> 2 & 3)]
    let indirect = cfg & 0x10 != 0
    let (memory, layout) = try! SplitDeviceModel.allocateRing(size: size)
    defer { SplitDeviceModel.freeRing(memory) }
    var q = SplitVirtqueue(memory: memory, layout: layout, inOrder: inOrder, eventIndex: eventIndex)
    q.recycleInTableOrder = cfg & 0x20 != 0
    let entries = 4
    let tables = UnsafeMutablePointer<VirtqDesc>.allocate(capacity: size * entries)
    tables.initialize(repeating: VirtqDesc(), count: size * entries)
    defer { tables.deallocate() }
    if indirect {
        q.useIndirect(IndirectTables(base: tables, baseAddress: UInt64(UInt(bitPattern: tables)), entriesPerTable: entries))
        q.directChainLimit = 1 + Int(cfg >> 6)
    }
    let device = SplitDeviceModel(memory: memory, layout: layout, inOrder: inOrder)
    device.indirectNegotiated = indirect
    let shadow = QueueShadow(size: size, inOrder: inOrder)

    var steps = 0
    while !input.isEmpty && steps < 512 {
        steps += 1
        let op = input.u8()
        switch op % 20 {
        case 0, 1: shadow.postBurst(&q, &input)
        case 2: shadow.postChain(&q, &input)
        case 3: _ = q.publish()
        case 4: device.popAvailable()
        case 5:
            // Any used entry at any slot near the used index, not published.
            let slot = input.bool() ? device.usedIdx &+ UInt16(input.u8() % UInt8(2 * size)) : input.u16()
            let (id, limit) = pickID(device, &input)
            device.writeUsed(at: slot, id: id, len: input.length(around: limit))
        case 6:
            // The used index: forward, backward or anywhere.
            switch input.u8() & 3 {
            case 0: device.setUsedIdx(device.usedIdx &+ UInt16(input.u8() % UInt8(2 * size + 1)))
            case 1: device.setUsedIdx(device.usedIdx &- UInt16(input.u8() & 7))
            case 2: device.setUsedIdx(input.u16())
            default: device.setUsedIdx(device.lastAvail)
            }
        case 7:
            let (id, limit) = pickID(device, &input)
            device.injectUsed(id: id, len: input.length(around: limit), advance: UInt16(input.u8() & 3))
        case 8:
            // Legitimate in-order completions, lengths mostly legal.
            let k = input.int(0...device.pending.count)
            device.completeInOrder(count: k) { chain in
                input.u8() & 3 == 0 ? input.length(around: chain.writableBytes) : chain.writableBytes
            }
        case 9:
            // Out of order: some pending chains in a chosen order.
            var ids: [UInt16] = []
            var lens: [UInt32] = []
            var pool = device.pending
            let k = input.int(0...pool.count)
            for _ in 0..<k where !pool.isEmpty {
                let c = pool.remove(at: input.int(0...pool.count - 1))
                guard !ids.contains(c.headId) else { continue }
                ids.append(c.headId)
                lens.append(input.u8() & 3 == 0 ? input.length(around: c.writableBytes) : c.writableBytes)
            }
            device.complete(ids: ids, lengths: lens)
        case 10:
            guard !device.pending.isEmpty else { break }
            let k = input.int(1...device.pending.count)
            let last = device.pending[k - 1].writableBytes
            device.completeBatchAsOne(count: k, lastLength: input.bool() ? last : input.length(around: last))
        case 11:
            if input.bool() { device.setAvailEvent(input.u16()) } else { device.setNoNotify(input.bool()) }
        case 12, 13, 14:
            // The closure form (oldest first in order) and the array form.
            let max = input.int(0...2 * size + 1)
            if op & 1 == 0 {
                let before = q.failure
                var got: [(UnsafeMutableRawPointer?, UInt32)] = []
                let n = q.harvest(max: max) { got.append(($0, $1)) }
                shadow.accept(got, count: n, max: max, failureBefore: before)
            } else {
                shadow.harvest(&q, max: max)
            }
        case 15:
            let before = q.failure
            let n = q.completedCount()
            invariant(n >= 0 && n <= size, "completedCount \(n) with a queue of \(size)")
            if before != nil { invariant(n == 0, "completedCount \(n) after failure") }
        case 16: shadow.checkForEach(q)
        case 17:
            guard input.u8() & 3 == 0 else { break }
            // The device stops: every buffer back, then a restart at any ring position.
            shadow.reclaimAll(&q)
            if input.bool() {
                let base = UInt32(input.u16())
                q.restart(at: base)
                device.reset(toBase: base)
            } else {
                device.reset()
            }
        default:
            // A device that echoes everything it has (length 0), as a fast forward.
            if device.pending.isEmpty { device.echoAvailable() }
        }
        shadow.check(q)
    }
    // Whatever happened: everything still in flight comes back exactly once.
    shadow.reclaimAll(&q)
}

/// An id for a used entry: a pending chain's head (with its writable bytes as the limit), an id
/// just outside the table, or anything.
func pickID(_ device: SplitDeviceModel, _ input: inout FuzzInput) -> (UInt32, UInt32) {
    let pending = device.pending
    let choice = input.u8() & 3
    if choice < 2 && !pending.isEmpty {
        let c = pending[input.int(0...pending.count - 1)]
        return (UInt32(c.headId), c.writableBytes)
    }
    switch choice {
    case 2: return (UInt32(device.size) + UInt32(input.u8() & 3), 0)
    default:
        let id = input.u8() & 1 == 0 ? UInt32(input.u8()) % UInt32(device.size) : input.u32()
        return (id, UInt32(input.u16()))
    }
}
