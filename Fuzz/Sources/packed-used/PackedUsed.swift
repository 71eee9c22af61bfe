import FuzzSupport
import VirtioCore
import VirtioTestSupport

// packed-used: a PackedVirtqueue (in order or out of order, 4/8/16/5 entries: packed rings need
// not be a power of two, optionally with EVENT_IDX) whose device is the fuzz input: legitimate
// completions (in order, by ID, one descriptor for a batch) and arbitrary used descriptors at any
// position, with any ID, length and flags (wrap bits, WRITE, NEXT), interleaved with driver posts,
// publishes, harvests and reclaims. QueueShadow checks every result (see its comment). The device
// side is PackedDevice (this target), a lighter PackedDeviceModel.
//
// Input: byte 0 = configuration, then one step per byte (plus the step's operands).

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    var input = FuzzInput(data, size)
    runPacked(&input)
    return 0
}

func runPacked(_ input: inout FuzzInput) {
    let cfg = input.u8()
    let inOrder = cfg & 1 != 0
    let eventIndex = cfg & 2 != 0
    let size = [8, 4, 16, 5][Int(cfg >> 2 & 3)]
    guard let (memory, layout) = try? PackedDeviceModel.allocateRing(size: size) else { return }
    defer { PackedDeviceModel.freeRing(memory) }
    var q = PackedVirtqueue(memory: memory, layout: layout, inOrder: inOrder, eventIndex: eventIndex)
    let device = PackedDevice(memory: memory, layout: layout)
    let shadow = QueueShadow(size: size, inOrder: inOrder)
    let wrapBits = PackedDesc.flagAvail | PackedDesc.flagUsed

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
            // Any descriptor at any position: ID, length and flags as the input says, the wrap
            // bits of this lap, the other lap, or half of each.
            let position = input.bool() ? UInt16((Int(device.usedPosition) + Int(input.u8() & 7)) % size)
                                        : UInt16(Int(input.u16()) % size)
            let (id, limit) = pickID(device, &input)
            let len = input.length(around: limit)
            var flags = input.u16() & ~wrapBits
            switch input.u8() & 3 {
            case 0: flags |= device.usedWrap ? wrapBits : 0
            case 1: flags |= device.usedWrap ? 0 : wrapBits
            case 2: flags |= PackedDesc.flagAvail
            default: flags |= PackedDesc.flagUsed
            }
            if input.u8() & 3 != 0 { flags |= VirtqDesc.flagWrite }
            device.writeUsed(at: position, id: id, len: len, flags: flags)
        case 6:
            let (id, limit) = pickID(device, &input)
            device.injectUsed(id: id, len: input.length(around: limit), advance: Int(input.u8() % UInt8(size + 2)))
        case 7:
            // A used descriptor of the other lap at the used position.
            let (id, limit) = pickID(device, &input)
            device.injectUsed(id: id, len: input.length(around: limit), advance: 0, wrongWrap: true)
        case 8, 9:
            // In order (the oldest k), or some pending buffers in a chosen order.
            let k = input.int(0...device.pending.count)
            var indices = Array(0..<k)
            if op % 20 == 9 {
                var candidates = Array(device.pending.indices)
                indices = []
                for _ in 0..<k { indices.append(candidates.remove(at: input.int(0...candidates.count - 1))) }
            }
            let lens = indices.map { i -> UInt32 in
                let w = device.pending[i].writableBytes
                return input.u8() & 3 == 0 ? input.length(around: w) : w
            }
            device.complete(indices: indices, lengths: lens)
        case 10:
            guard !device.pending.isEmpty else { break }
            let k = input.int(1...device.pending.count)
            let last = device.pending[k - 1].writableBytes
            device.completeBatchAsOne(count: k, lastLength: input.bool() ? last : input.length(around: last))
        case 11:
            // Device event suppression: enable, disable, desc with any off_wrap, or junk flags.
            let flags: UInt16 = input.u8() & 3 == 3 ? input.u16() : UInt16(input.u8() % 3)
            device.setDeviceEvent(flags: flags, offWrap: input.u16())
        case 12, 13, 14:
            let max = input.int(0...2 * size + 1)
            if op & 1 == 0 {
                let before = q.failure
                var got: [(UnsafeMutableRawPointer?, UInt32)] = []
                let n = q.harvest(max: max) { got.append(($0, $1)) }
                shadow.accept(got, count: n, max: max, failureBefore: before)
            } else {
                shadow.harvest(&q, max: max)
            }
        case 15: shadow.checkForEach(q)
        case 16:
            guard input.u8() & 3 == 0 else { break }
            // The device stops: every buffer back, then a restart at any position and wrap counter.
            shadow.reclaimAll(&q)
            if input.bool() {
                let base = UInt32(Int(input.u16() & 0x7fff) % size) | (input.bool() ? 0x8000 : 0)
                q.restart(at: base)
                device.reset(toBase: base)
            } else {
                device.reset()
            }
        default:
            // Fast forward: a device that completes everything available at once.
            device.popAvailable()
            device.complete(indices: Array(device.pending.indices), lengths: device.pending.map(\.writableBytes))
        }
        shadow.check(q)
    }
    shadow.reclaimAll(&q)
}

/// A buffer ID for a used descriptor: a pending buffer's (with its writable bytes as the limit),
/// one just outside the ring, or anything.
func pickID(_ device: PackedDevice, _ input: inout FuzzInput) -> (UInt16, UInt32) {
    let choice = input.u8() & 3
    if choice < 2 && !device.pending.isEmpty {
        let b = device.pending[input.int(0...device.pending.count - 1)]
        return (b.id, b.writableBytes)
    }
    switch choice {
    case 2: return (UInt16(device.size) &+ UInt16(input.u8() & 3), 0)
    default:
        let id = input.u8() & 1 == 0 ? UInt16(input.u8()) % UInt16(device.size) : input.u16()
        return (id, UInt32(input.u16()))
    }
}
