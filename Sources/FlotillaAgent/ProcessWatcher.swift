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

/// Watches processes through pidfds on one dedicated thread blocked in `epoll_wait(2)`: no
/// polling timers, no SIGCHLD handler to share, and it works for processes adopted after a restart
/// (which are not our children). Each exit is delivered once, on `exits`. Watching one more
/// process, or one exiting, costs the same with ten thousand watched as with one.
final class ProcessWatcher: Sendable {
    private struct Watched {
        let key: String
        let closesWhenDone: Bool
    }

    private struct State {
        var watched: [Int32: Watched] = [:]  // pidfd → what it is
        var stopped = false
    }

    let exits: AsyncStream<(key: String, exit: ProcessExit)>
    private let continuation: AsyncStream<(key: String, exit: ProcessExit)>.Continuation
    private let state = Mutex(State())
    private let epollFD: Int32
    /// Written to wake the loop when the watcher stops.
    private let wakeFD: Int32

    init() {
        (exits, continuation) = AsyncStream.makeStream(of: (key: String, exit: ProcessExit).self)
        epollFD = flotilla_epoll_create()
        wakeFD = flotilla_eventfd()
        _ = flotilla_epoll_add(epollFD, wakeFD)
        let thread = Thread { [self] in self.loop() }
        thread.name = "flotilla-process-watcher"
        thread.start()
    }

    /// Starts watching `pidfd` under `key`. With `closesWhenDone` the watcher owns the descriptor
    /// and closes it after the exit; without, it stays the caller's (who signals through it too,
    /// and closes it only once the exit was delivered: one descriptor per instance, not two).
    func watch(pidfd: Int32, key: String, closesWhenDone: Bool = true) {
        guard pidfd >= 0 else { return }
        state.withLock { $0.watched[pidfd] = Watched(key: key, closesWhenDone: closesWhenDone) }
        if flotilla_epoll_add(epollFD, pidfd) != 0 {
            // Not watchable (cannot happen for a pidfd short of memory): deliver an unknown exit
            // rather than lose the process.
            let watched = state.withLock { $0.watched.removeValue(forKey: pidfd) }
            if watched?.closesWhenDone == true { close(pidfd) }
            continuation.yield((key, ProcessExit(code: nil, signal: nil)))
        }
    }

    func stop() {
        state.withLock { $0.stopped = true }
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    private func loop() {
        var ready = [Int32](repeating: -1, count: 256)
        while true {
            if state.withLock({ $0.stopped }) {
                continuation.finish()
                return
            }
            let count = ready.withUnsafeMutableBufferPointer { flotilla_epoll_wait(epollFD, $0.baseAddress, Int32($0.count)) }
            if count < 0 {
                if errno != EINTR { usleep(10_000) }
                continue
            }
            for fd in ready.prefix(Int(count)) {
                if fd == wakeFD {
                    var counter: UInt64 = 0
                    _ = read(wakeFD, &counter, 8)
                    continue
                }
                var code: Int32 = 0
                var signal: Int32 = 0
                let result = flotilla_pidfd_reap(fd, &code, &signal)
                let exit: ProcessExit
                if result == 1 {
                    exit = signal != 0 ? ProcessExit(code: nil, signal: signal) : ProcessExit(code: code, signal: nil)
                } else if result == 0 {
                    continue  // spurious wake-up
                } else {
                    exit = ProcessExit(code: nil, signal: nil)  // not our child: the outcome is unknown
                }
                _ = flotilla_epoll_remove(epollFD, fd)
                let watched = state.withLock { $0.watched.removeValue(forKey: fd) }
                if watched?.closesWhenDone != false { close(fd) }
                if let watched { continuation.yield((watched.key, exit)) }
            }
        }
    }
}
