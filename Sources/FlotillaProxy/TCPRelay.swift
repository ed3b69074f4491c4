import NIOCore

/// A TCP route's connections: the client's stream and the upstream's, each one's bytes written to
/// the other. A side that cannot keep up stops the other's reads; when one side ends, what it
/// sent is delivered and then the other side ends too.
enum TCPRelay {
    /// Connects a client of the route to `target`; the client is read only once the upstream is up.
    static func start(client: Stream, target: TargetState, loop: IOLoop, timeout: TimeAmount, ejectAfter: Int, coolDown: Duration) {
        client.setReading(false)
        loop.pool.resolve(host: target.host, port: target.port) { address in
            guard let address, client.isOpen else {
                client.close()
                return
            }
            Stream.connect(to: address, on: loop, timeout: timeout) { result in
                switch result {
                case .success(let upstream):
                    target.succeeded()
                    guard client.isOpen else {
                        upstream.close()
                        return
                    }
                    client.delegate = Direction(to: upstream)
                    upstream.delegate = Direction(to: client)
                    client.setReading(true)
                case .failure:
                    target.connectFailed(limit: ejectAfter, coolDown: coolDown)
                    client.close()
                }
            }
        }
    }

    /// Reads of one stream, written to `to`. Each stream holds its direction, and so the other
    /// stream, until it closes.
    private final class Direction: StreamDelegate {
        let to: Stream

        init(to: Stream) {
            self.to = to
        }

        func streamRead(_ bytes: ByteBuffer) { to.write(bytes) }
        func streamReadComplete() { to.flush() }
        /// This stream's own writes back up: stop reading the stream that feeds it.
        func streamWritabilityChanged(_ writable: Bool) { to.setReading(writable) }
        func streamClosed(_ error: SystemCallError?) { to.closeWhenFlushed() }
    }
}
