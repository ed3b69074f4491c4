import CFlotillaSpawn
import Foundation
import Glibc
import Synchronization

/// How a process ended.
public struct ProcessExit: Sendable, Hashable {
    /// The exit status, when the process exited by itself and was our child.
    public var code: Int32?
    /// The signal that ended it, when one did and it was our child.
    public var signal: Int32?

    public init(code: Int32?, signal: Int32?) {
        self.code = code
        self.signal = signal
    }

    /// Nothing is known: the process was adopted after an agent restart and is not our child.
    public var isUnknown: Bool { code == nil && signal == nil }
}

/// Watches processes through pidfds on one dedicated thread blocked in `poll(2)`: no polling
/// timers, no SIGCHLD handler to share, and it works for processes adopted after a restart
/// (which are not our children). Each exit is delivered once, on `exits`.
final class ProcessWatcher: Sendable {
    struct Watched: Sendable {
        let key: String
        let pidfd: Int32
    }

    private struct State {
        var watched: [Int32: String] = [:]  // pidfd → key
        var stopped = false
    }

    let exits: AsyncStream<(key: String, exit: ProcessExit)>
    private let continuation: AsyncStream<(key: String, exit: ProcessExit)>.Continuation
    private let state = Mutex(State())
    /// Written to wake the poll loop when the watched set changes.
    private let wakeFD: Int32

    init() {
        (exits, continuation) = AsyncStream.makeStream(of: (key: String, exit: ProcessExit).self)
        wakeFD = flotilla_eventfd()
        let thread = Thread { [self] in self.loop() }
        thread.name = "flotilla-process-watcher"
        thread.start()
    }

    /// Starts watching `pidfd` (taking ownership of it) under `key`.
    func watch(pidfd: Int32, key: String) {
        state.withLock { $0.watched[pidfd] = key }
        wake()
    }

    func stop() {
        state.withLock { $0.stopped = true }
        wake()
    }

    private func wake() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    private func loop() {
        while true {
            let (descriptors, stopped) = state.withLock { ($0.watched.keys.sorted(), $0.stopped) }
            if stopped {
                continuation.finish()
                return
            }
            var fds = [pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)]
            fds += descriptors.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let ready = poll(&fds, nfds_t(fds.count), -1)
            if ready < 0 {
                if errno == EINTR { continue }
                usleep(10_000)
                continue
            }
            if fds[0].revents != 0 {
                var counter: UInt64 = 0
                _ = read(wakeFD, &counter, 8)
            }
            for entry in fds.dropFirst() where entry.revents != 0 {
                var code: Int32 = 0
                var signal: Int32 = 0
                let result = flotilla_pidfd_reap(entry.fd, &code, &signal)
                let exit: ProcessExit
                if result == 1 {
                    exit = signal != 0 ? ProcessExit(code: nil, signal: signal) : ProcessExit(code: code, signal: nil)
                } else if result == 0 {
                    continue  // spurious wake-up
                } else {
                    exit = ProcessExit(code: nil, signal: nil)  // not our child: the outcome is unknown
                }
                let key = state.withLock { $0.watched.removeValue(forKey: entry.fd) }
                close(entry.fd)
                if let key { continuation.yield((key, exit)) }
            }
        }
    }
}
