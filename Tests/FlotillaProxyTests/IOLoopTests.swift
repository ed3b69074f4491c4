#if canImport(Glibc)
import Glibc
#endif
@testable import FlotillaProxy
import NIOCore
import Synchronization
import Testing

/// The proxy's event loop on real threads and real loopback sockets.
@Suite struct IOLoopTests {
    /// Collects what happens on a loop, for a test thread to read.
    final class Record: Sendable {
        let events = Mutex<[String]>([])
        func add(_ event: String) { events.withLock { $0.append(event) } }
        var all: [String] { events.withLock { $0 } }
    }

    /// Waits (polling) until `condition` holds, for up to 5 s.
    func eventually(_ condition: () -> Bool) async throws {
        for _ in 0..<500 where !condition() {
            try await Task.sleep(for: .milliseconds(10))
        }
    }

    @Test func timersFireInDeadlineOrderAndCancelledOnesDoNot() async throws {
        let loop = try IOLoop(index: 0)
        loop.start()
        defer { loop.stop() }
        let record = Record()
        try await loop.submit {
            let now = NIODeadline.now()
            loop.schedule(at: now + .milliseconds(60)) { record.add("c") }
            loop.schedule(at: now + .milliseconds(20)) {
                record.add("a")
                // A timer scheduled by a timer's action (the heap is not borrowed while it runs).
                loop.schedule(in: .milliseconds(10)) { record.add("a2") }
            }
            let cancelled = loop.schedule(at: now + .milliseconds(30)) { record.add("never") }
            loop.schedule(at: now + .milliseconds(40)) { record.add("b") }
            cancelled.cancel()
        }
        try await eventually { record.all.count == 4 }
        try await Task.sleep(for: .milliseconds(50))
        #expect(record.all == ["a", "a2", "b", "c"])
    }

    /// An echo server on one loop, a client stream on another: a payload far larger than the
    /// socket buffers comes back whole and in order (partial writes, `writev`, the write queue's
    /// watermarks and reading switched off and on all happen on the way).
    @Test func streamsCarryALargePayloadBothWays() async throws {
        let server = try IOLoop(index: 0)
        let client = try IOLoop(index: 1)
        server.start()
        client.start()
        defer {
            server.stop()
            client.stop()
        }
        let listening = try Listener.bind(host: "127.0.0.1", port: 0)
        try await server.submit {
            try server.listen(on: listening.fd) { stream, _ in stream.delegate = Echo(stream) }
        }
        let payload = ByteBuffer(bytes: (0..<(8 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        let received = Received()
        let record = Record()
        let address = try SocketAddress(ipAddress: "127.0.0.1", port: listening.port)
        client.execute {
            Stream.connect(to: address, on: client, timeout: .seconds(2)) { result in
                guard case .success(let stream) = result else {
                    record.add("connect failed")
                    return
                }
                stream.delegate = Collector(received: received, record: record)
                stream.write(payload)
                stream.flush()
            }
        }
        try await eventually { received.bytes.readableBytes >= payload.readableBytes }
        #expect(record.all.isEmpty)
        #expect(received.bytes == payload)
        _ = try await server.submit { server.stopListening(on: listening.fd) }
    }

    @Test func aRefusedConnectIsReported() async throws {
        let loop = try IOLoop(index: 0)
        loop.start()
        defer { loop.stop() }
        // A port that was just free: bound, then closed without listening.
        let unused = try Listener.bind(host: "127.0.0.1", port: 0)
        _ = close(unused.fd)
        let address = try SocketAddress(ipAddress: "127.0.0.1", port: unused.port)
        let record = Record()
        loop.execute {
            Stream.connect(to: address, on: loop, timeout: .seconds(2)) { result in
                switch result {
                case .success: record.add("connected")
                case .failure(let error): record.add("\(error.errno)")
                }
            }
        }
        try await eventually { !record.all.isEmpty }
        #expect(record.all == ["\(ECONNREFUSED)"])
    }

    /// Writes back what it reads; stops reading while its writes back up.
    final class Echo: StreamDelegate {
        let stream: Stream
        init(_ stream: Stream) { self.stream = stream }
        func streamRead(_ bytes: ByteBuffer) { stream.write(bytes) }
        func streamReadComplete() { stream.flush() }
        func streamWritabilityChanged(_ writable: Bool) { stream.setReading(writable) }
        func streamClosed(_ error: SystemCallError?) {}
    }

    final class Received: Sendable {
        private let buffer = Mutex(ByteBuffer())
        var bytes: ByteBuffer { buffer.withLock { $0 } }
        func append(_ bytes: ByteBuffer) { buffer.withLock { $0.writeImmutableBuffer(bytes) } }
    }

    final class Collector: StreamDelegate {
        let received: Received
        let record: Record

        init(received: Received, record: Record) {
            self.received = received
            self.record = record
        }

        func streamRead(_ bytes: ByteBuffer) { received.append(bytes) }
        func streamReadComplete() {}
        func streamWritabilityChanged(_ writable: Bool) {}
        func streamClosed(_ error: SystemCallError?) { record.add("closed: \(String(describing: error))") }
    }
}
