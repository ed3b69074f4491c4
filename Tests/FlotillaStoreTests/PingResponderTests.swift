@testable import FlotillaEtcd
import NIOCore
import NIOEmbedded
import Testing

/// The HTTP/2 PING responder under the etcd client: PINGs leave the inbound byte stream, their
/// ACKs join the outbound one only between frames, every other byte passes unchanged.
@Suite struct PingResponderTests {
    func frame(type: UInt8, flags: UInt8 = 0, stream: UInt32 = 0, payload: [UInt8]) -> [UInt8] {
        let length = payload.count
        return [UInt8(length >> 16), UInt8(length >> 8 & 0xFF), UInt8(length & 0xFF), type, flags]
            + [UInt8(stream >> 24), UInt8(stream >> 16 & 0xFF), UInt8(stream >> 8 & 0xFF), UInt8(stream & 0xFF)] + payload
    }

    func bytes(_ buffer: ByteBuffer?) -> [UInt8] { buffer.map { Array($0.readableBytesView) } ?? [] }

    func drainOutbound(_ channel: EmbeddedChannel) throws -> [UInt8] {
        var all: [UInt8] = []
        while let data = try channel.readOutbound(as: IOData.self) {
            if case .byteBuffer(let buffer) = data { all += buffer.readableBytesView }
        }
        return all
    }

    @Test func takesPingsOutAndAnswersThemBetweenFrames() throws {
        let channel = EmbeddedChannel(handler: PingResponder())
        defer { _ = try? channel.finish() }
        let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
        let data = frame(type: 0, stream: 1, payload: Array("hello".utf8))
        let ping = frame(type: 6, payload: [1, 2, 3, 4, 5, 6, 7, 8])
        let headers = frame(type: 1, flags: 4, stream: 3, payload: [0x88])

        // The client has sent its preface and half a frame when the server's PING arrives, split in two reads.
        let outgoing = frame(type: 0, stream: 1, payload: Array(repeating: 7, count: 20))
        try channel.writeOutbound(IOData.byteBuffer(ByteBuffer(bytes: preface + outgoing.prefix(12))))
        try channel.writeInbound(ByteBuffer(bytes: data + ping.prefix(5)))
        try channel.writeInbound(ByteBuffer(bytes: ping.dropFirst(5) + headers))
        var forwarded: [UInt8] = []
        while let buffer = try channel.readInbound(as: ByteBuffer.self) { forwarded += buffer.readableBytesView }
        #expect(forwarded == data + headers)
        // Mid-frame: the ACK waits.
        #expect(try drainOutbound(channel) == preface + outgoing.prefix(12))
        try channel.writeOutbound(IOData.byteBuffer(ByteBuffer(bytes: Array(outgoing.dropFirst(12)))))
        let ack = frame(type: 6, flags: 1, payload: [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(try drainOutbound(channel) == Array(outgoing.dropFirst(12)) + ack)
    }

    @Test func answersAtOnceWhenNothingIsBeingWritten() throws {
        let channel = EmbeddedChannel(handler: PingResponder())
        defer { _ = try? channel.finish() }
        let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
        try channel.writeOutbound(IOData.byteBuffer(ByteBuffer(bytes: preface)))
        _ = try drainOutbound(channel)
        try channel.writeInbound(ByteBuffer(bytes: frame(type: 6, payload: [9, 9, 9, 9, 9, 9, 9, 9])))
        #expect(try channel.readInbound(as: ByteBuffer.self) == nil)
        #expect(try drainOutbound(channel) == frame(type: 6, flags: 1, payload: [9, 9, 9, 9, 9, 9, 9, 9]))
        // A PING ACK from the server (an answer to the client's own PING) passes through.
        let ackIn = frame(type: 6, flags: 1, payload: [1, 1, 1, 1, 1, 1, 1, 1])
        try channel.writeInbound(ByteBuffer(bytes: ackIn))
        #expect(bytes(try channel.readInbound(as: ByteBuffer.self)) == ackIn)
    }
}
