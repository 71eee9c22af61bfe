import ArgumentParser

/// `--rate`: packets per second (`5Mpps`, `500kpps`, `1000000`) or a share of a 10 Gbit/s
/// Ethernet line at the frame size (`40%`; a frame occupies size + 20 bytes of preamble and gap).
enum RateSpec: ExpressibleByArgument, CustomStringConvertible {
    case pps(Double)
    case percent(Double)

    init?(argument: String) {
        let a = argument.lowercased()
        if a.hasSuffix("%"), let v = Double(a.dropLast()), v > 0, v <= 100 { self = .percent(v); return }
        for (suffix, scale) in [("mpps", 1e6), ("kpps", 1e3), ("pps", 1.0)] where a.hasSuffix(suffix) {
            guard let v = Double(a.dropLast(suffix.count)), v > 0 else { return nil }
            self = .pps(v * scale); return
        }
        guard let v = Double(a), v > 0 else { return nil }
        self = .pps(v)
    }

    func packetsPerSecond(averageFrameSize: Double) -> Double {
        switch self {
        case .pps(let v): v
        case .percent(let p): 10e9 * p / 100 / ((averageFrameSize + 20) * 8)
        }
    }

    var description: String {
        switch self { case .pps(let v): "\(v) pps"; case .percent(let p): "\(p)% of 10 Gbit/s" }
    }
}
