import FlotillaCore
import NIOCore
import NIOPosix

/// A connection to a syslog collector: TCP with RFC 6587 octet counting, or UDP with one message a
/// datagram (RFC 5426).
///
/// Over TCP nothing acknowledges a message (RFC 5424 has no acks; RELP is another protocol), so a
/// write that the kernel took may still be lost when the collector goes away. The forwarder
/// counts a batch as delivered only once the connection has stayed up a while after it
/// (`LogForwarder.confirmDelay`); `isAlive` tells it when it did not: the collector closing its end
/// closes the channel (no half-closure), and a reset fails it.
final class SyslogSender: Sendable {
    let target: LogForwardTarget
    private let channel: any Channel
    private let remote: SocketAddress?

    private init(target: LogForwardTarget, channel: any Channel, remote: SocketAddress?) {
        self.target = target
        self.channel = channel
        self.remote = remote
    }

    /// The largest UDP message: RFC 5426 asks receivers to take 2048 octets, and a datagram that
    /// size is not fragmented on common links.
    static let maxDatagramBytes = 2048
    /// The largest TCP message; collectors cut long ones at their own limit (rsyslog: 8 KiB by default).
    static let maxStreamMessageBytes = 64 << 10

    var maxMessageBytes: Int { target.transport == .udp ? Self.maxDatagramBytes : Self.maxStreamMessageBytes }

    static func connect(to target: LogForwardTarget, timeout: TimeAmount = .seconds(5)) async throws -> SyslogSender {
        switch target.transport {
        case .tcp:
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(timeout)
                .channelOption(.allowRemoteHalfClosure, value: false)
                .connect(host: target.host, port: target.port).get()
            return SyslogSender(target: target, channel: channel, remote: nil)
        case .udp:
            let remote = try SocketAddress.makeAddressResolvingHost(target.host, port: target.port)
            let local = remote.protocol == .inet6 ? "::" : "0.0.0.0"
            let channel = try await DatagramBootstrap(group: MultiThreadedEventLoopGroup.singleton).bind(host: local, port: 0).get()
            return SyslogSender(target: target, channel: channel, remote: remote)
        }
    }

    var isAlive: Bool { channel.isActive }

    /// Writes the messages (already cut to `maxMessageBytes`); returns once the kernel has them.
    func send(_ messages: [[UInt8]]) async throws {
        guard !messages.isEmpty else { return }
        if let remote {
            for message in messages.dropLast() {
                channel.write(AddressedEnvelope(remoteAddress: remote, data: channel.allocator.buffer(bytes: message)), promise: nil)
            }
            try await channel.writeAndFlush(AddressedEnvelope(remoteAddress: remote, data: channel.allocator.buffer(bytes: messages[messages.count - 1]))).get()
            return
        }
        var buffer = channel.allocator.buffer(capacity: messages.reduce(0) { $0 + $1.count + 8 })
        for message in messages { buffer.writeBytes(SyslogMessage.octetCounted(message)) }
        try await channel.writeAndFlush(buffer).get()
    }

    func close() async {
        try? await channel.close()
    }
}
