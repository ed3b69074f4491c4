#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CFlotillaIO
import Logging
import NIOCore
import Synchronization

/// The proxy's own event loop: one thread over one epoll instance, running the HTTP proxy's
/// sockets and timers and nothing else.
///
/// Why not NIO's channels: a proxy does little per request besides moving bytes between two
/// sockets, and NIO's channel pipeline (handler contexts, outbound promises, the pending-writes
/// state machine, a read per `read()` event) cost about as much user CPU per request as all of
/// HAProxy's HTTP processing (BENCHMARKS.md). This loop keeps only what the proxy needs:
/// level-triggered readiness, a write queue sent once per batch of events, reads into one reused
/// buffer, `send`/`recv` rather than `write`/`read` (no VFS layer), a timer heap and a wake-up
/// eventfd.
/// Everything registered with a loop is touched only on its thread; `execute` is the one way in
/// from another thread.
final class IOLoop: @unchecked Sendable {
    let index: Int
    private let epoll: Int32
    private let waker: Waker
    private let tasks = Mutex<[@Sendable () -> Void]>([])
    private var timers = TimerHeap()
    private var events: UnsafeMutablePointer<epoll_event>
    private static let eventCapacity = 256
    /// Objects deregistered during this batch of events: released after it, so an event for one
    /// of them later in the same batch still finds a live object (which then ignores it).
    private var retired: [Unmanaged<Selectable>] = []
    private var running = true
    /// Streams written to during this batch of events, flushed together after it, as HAProxy
    /// sends at the end of its loop: a peer finds several messages per wake-up rather than one
    /// (the proxy's system time per request was ~9% above HAProxy's, with the same system calls,
    /// until it flushed this way; BENCHMARKS.md).
    private var flushes: [Stream] = []
    /// Every open stream, so a stopping loop can close them.
    private var streams: [ObjectIdentifier: Stream] = [:]
    /// Reused for every read while no slice of it is held elsewhere (NIO's pooled receive buffer
    /// does the same).
    var receiveBuffer = ByteBufferAllocator().buffer(capacity: IOLoop.receiveSize)
    static let receiveSize = 16 * 1024
    let emptyBuffer = ByteBuffer()
    let allocator = ByteBufferAllocator()
    /// The upstream connections of this loop's clients.
    private(set) lazy var pool = UpstreamPool(loop: self)
    private var thread: pthread_t?

    let logger: Logger

    init(index: Int, logger: Logger = Logger(label: "flotilla.proxy")) throws {
        self.index = index
        self.logger = logger
        epoll = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard epoll >= 0 else { throw SystemCallError(errno: errno, "epoll_create1") }
        let wake = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        guard wake >= 0 else { throw SystemCallError(errno: errno, "eventfd") }
        events = .allocate(capacity: Self.eventCapacity)
        waker = Waker(fd: wake)
        waker.loop = self
        try register(waker, events: EPOLLIN.rawValue)
    }

    deinit {
        events.deallocate()
        Glibc.close(waker.fd)
        Glibc.close(epoll)
    }

    // MARK: Threads

    /// Starts the loop's thread.
    func start() {
        let box = Unmanaged.passRetained(self)
        var handle = pthread_t()
        let result = pthread_create(&handle, nil, { argument in
            let loop = Unmanaged<IOLoop>.fromOpaque(argument!).takeRetainedValue()
            let name = "flotilla-proxy-\(loop.index)"
            _ = cflotilla_name_thread(name)
            loop.run()
            return nil
        }, box.toOpaque())
        precondition(result == 0, "pthread_create failed: \(result)")
        thread = handle
    }

    /// Runs `task` on the loop's thread, soon. Safe from any thread.
    func execute(_ task: @escaping @Sendable () -> Void) {
        tasks.withLock { $0.append(task) }
        waker.wake()
    }

    /// Closes every stream and ends the thread; returns once it has ended.
    func stop() {
        execute { [self] in
            running = false
            for listener in listeners.values { listener.close() }
            listeners.removeAll()
            for stream in Array(streams.values) { stream.close() }
        }
        if let thread { pthread_join(thread, nil) }
        thread = nil
    }

    private func run() {
        while running {
            let timeout = timers.millisecondsUntilNext(now: Self.now())
            let count = epoll_wait(epoll, events, Int32(Self.eventCapacity), timeout)
            if count < 0 {
                if errno == EINTR { continue }
                fatalError("epoll_wait failed: \(SystemCallError(errno: errno, "epoll_wait"))")
            }
            for i in 0..<Int(count) {
                let event = events[i]
                Unmanaged<Selectable>.fromOpaque(event.data.ptr!).takeUnretainedValue().ready(event.events)
            }
            if !timers.isEmpty {
                let now = Self.now()
                while let timer = timers.popDue(now: now) {
                    if let action = timer.action {
                        timer.action = nil
                        action()
                    }
                }
            }
            if !flushes.isEmpty { flushAll() }
            if !retired.isEmpty {
                for object in retired { object.release() }
                retired.removeAll(keepingCapacity: true)
            }
        }
        for object in retired { object.release() }
        retired.removeAll()
    }

    /// Sends what every stream written during this batch queued. Flushing may queue more
    /// (a stream that closes when flushed ends its partner), so the list is walked as it grows.
    private func flushAll() {
        var index = 0
        while index < flushes.count {
            let stream = flushes[index]
            stream.flushDeferred()
            index += 1
        }
        flushes.removeAll(keepingCapacity: true)
    }

    /// Queues `stream` for the end-of-batch flush.
    func flushLater(_ stream: Stream) {
        flushes.append(stream)
    }

    fileprivate func runTasks() {
        let pending = tasks.withLock { tasks in
            defer { tasks.removeAll(keepingCapacity: true) }
            return tasks
        }
        for task in pending { task() }
    }

    // MARK: Accepting

    private var listeners: [Int32: Listener] = [:]

    /// Accepts connections from the shared listening socket `fd` onto this loop. On the loop.
    func listen(on fd: Int32, onAccept: @escaping (Stream, String) -> Void) throws {
        let listener = Listener(fd: fd, loop: self, onAccept: onAccept)
        try register(listener, events: Listener.interest)
        listeners[fd] = listener
    }

    /// Stops accepting from `fd` (the socket is not closed: it is shared). On the loop.
    func stopListening(on fd: Int32) {
        listeners.removeValue(forKey: fd)?.close()
    }

    /// Runs `task` on the loop and waits for it.
    func submit<Result: Sendable>(_ task: @escaping @Sendable () throws -> Result) async throws -> Result {
        try await withCheckedThrowingContinuation { continuation in
            execute { continuation.resume(with: Swift.Result { try task() }) }
        }
    }

    // MARK: Draining

    /// Asks every client connection to finish what it is doing and close, and closes idle
    /// upstream connections. On the loop.
    func drain() {
        for stream in Array(streams.values) {
            (stream.delegate as? any Draining)?.drain()
        }
        pool.prune(keeping: [], idleLimit: .zero)
    }

    /// Open connections (clients, and upstreams still in use), for a caller waiting for a drain.
    var openStreams: Int { streams.count }

    // MARK: Registration

    func register(_ object: Selectable, events: UInt32) throws {
        var event = epoll_event()
        event.events = events
        event.data.ptr = Unmanaged.passRetained(object).toOpaque()
        guard epoll_ctl(epoll, EPOLL_CTL_ADD, object.fd, &event) == 0 else {
            Unmanaged.passUnretained(object).release()
            throw SystemCallError(errno: errno, "epoll_ctl(ADD)")
        }
        object.registeredEvents = events
        object.registered = true
        if let stream = object as? Stream { streams[ObjectIdentifier(stream)] = stream }
    }

    func update(_ object: Selectable, events: UInt32) {
        guard object.registered, object.registeredEvents != events else { return }
        var event = epoll_event()
        event.events = events
        event.data.ptr = Unmanaged.passUnretained(object).toOpaque()
        if epoll_ctl(epoll, EPOLL_CTL_MOD, object.fd, &event) == 0 { object.registeredEvents = events }
    }

    func deregister(_ object: Selectable) {
        guard object.registered else { return }
        object.registered = false
        _ = epoll_ctl(epoll, EPOLL_CTL_DEL, object.fd, nil)
        if let stream = object as? Stream { streams[ObjectIdentifier(stream)] = nil }
        retired.append(Unmanaged.passUnretained(object))
    }

    // MARK: Time

    /// Monotonic nanoseconds (the clock NIODeadline uses).
    static func now() -> UInt64 { NIODeadline.now().uptimeNanoseconds }

    /// Runs `action` on this loop at `deadline` unless cancelled first.
    @discardableResult
    func schedule(at deadline: NIODeadline, _ action: @escaping () -> Void) -> IOTimer {
        let timer = IOTimer(deadline: deadline.uptimeNanoseconds, action: action)
        timers.push(timer)
        return timer
    }

    func schedule(in delay: TimeAmount, _ action: @escaping () -> Void) -> IOTimer {
        schedule(at: .now() + delay, action)
    }
}

/// A connection that can be asked to finish and close, for a graceful shutdown.
protocol Draining: AnyObject {
    func drain()
}

/// What the loop polls: a socket or its wake-up eventfd.
class Selectable {
    final var fd: Int32
    final var registered = false
    final var registeredEvents: UInt32 = 0

    init(fd: Int32) {
        self.fd = fd
    }

    /// Called with the epoll events reported for `fd`.
    func ready(_ events: UInt32) {}
}

private final class Waker: Selectable {
    unowned(unsafe) var loop: IOLoop!
    private let armed = Atomic<Bool>(false)

    func wake() {
        // One write wakes the loop; further ones until it runs the tasks would be wasted.
        guard !armed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        var one: UInt64 = 1
        _ = Glibc.write(fd, &one, 8)
    }

    override func ready(_ events: UInt32) {
        var value: UInt64 = 0
        _ = Glibc.read(fd, &value, 8)
        armed.store(false, ordering: .sequentiallyConsistent)
        loop.runTasks()
    }
}

/// A one-shot timer on a loop; `cancel` is cheap (the heap entry is dropped when it comes due, or
/// by the next sweep).
final class IOTimer {
    let deadline: UInt64
    fileprivate var action: (() -> Void)?

    fileprivate init(deadline: UInt64, action: @escaping () -> Void) {
        self.deadline = deadline
        self.action = action
    }

    func cancel() { action = nil }
}

/// A binary min-heap of timers by deadline.
private struct TimerHeap {
    private var items: [IOTimer] = []
    /// The heap is swept of cancelled timers when it grows to this size: every connection
    /// schedules an idle check 75 s out, and short-lived connections cancel theirs long before it
    /// comes due, so without sweeping the dead would pile up at the connection rate × 75 s.
    private var sweepAt = 1024

    var isEmpty: Bool { items.isEmpty }

    mutating func push(_ timer: IOTimer) {
        if items.count >= sweepAt { sweep() }
        items.append(timer)
        siftUp(items.count - 1)
    }

    private mutating func siftUp(_ start: Int) {
        var child = start
        while child > 0 {
            let parent = (child - 1) / 2
            guard items[child].deadline < items[parent].deadline else { break }
            items.swapAt(child, parent)
            child = parent
        }
    }

    /// Drops cancelled timers and rebuilds the heap; the next sweep waits until the heap has
    /// doubled again, so sweeping costs O(1) per push over time.
    private mutating func sweep() {
        items.removeAll { $0.action == nil }
        items.sort { $0.deadline < $1.deadline }
        sweepAt = max(1024, items.count * 2)
    }

    private mutating func pop() -> IOTimer {
        let top = items[0]
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var parent = 0
            while true {
                let left = 2 * parent + 1
                let right = left + 1
                var smallest = parent
                if left < items.count && items[left].deadline < items[smallest].deadline { smallest = left }
                if right < items.count && items[right].deadline < items[smallest].deadline { smallest = right }
                if smallest == parent { break }
                items.swapAt(parent, smallest)
                parent = smallest
            }
        }
        return top
    }

    /// How long epoll may sleep: until the next live timer, or forever (-1).
    mutating func millisecondsUntilNext(now: UInt64) -> Int32 {
        while let first = items.first, first.action == nil { _ = pop() }
        guard let first = items.first else { return -1 }
        if first.deadline <= now { return 0 }
        // Rounded up, so a timer never fires early and the loop does not spin just before it.
        return Int32(min((first.deadline - now + 999_999) / 1_000_000, UInt64(Int32.max)))
    }

    /// The next timer due by `now`, taken off the heap (it runs outside the heap's access: an
    /// action may schedule another timer).
    mutating func popDue(now: UInt64) -> IOTimer? {
        guard let first = items.first, first.deadline <= now else { return nil }
        return pop()
    }
}

/// A failed system call, with what it was.
struct SystemCallError: Error, CustomStringConvertible {
    let errno: Int32
    let call: String

    init(errno: Int32, _ call: String) {
        self.errno = errno
        self.call = call
    }

    var description: String { "\(call): \(String(cString: strerror(errno)))" }
}
