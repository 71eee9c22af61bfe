import ArgumentParser

@main
struct Vio: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vio",
        abstract: "swift-virtio: poll-mode virtio drivers on DPDK memory.",
        subcommands: [Fwd.self, Pktgen.self, Blkbench.self, Blkio.self, Httpd.self])

    /// `--reconnect` takes an optional value, which ArgumentParser has no form for.
    static func main() {
        main(ReconnectOption.rewrite(Array(CommandLine.arguments.dropFirst())))
    }
}
