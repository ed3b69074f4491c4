/// The node's health and readiness checks on one timer: every check's next due time sits in a
/// min-heap, one loop sleeps until the earliest, and due probes run with at most `concurrency` in
/// flight. Ten thousand instances with a check each cost one sleeping loop and a heap, not ten
/// thousand sleeping tasks; a burst of due checks queues behind the bound instead of crowding out
/// launches and the API.
///
/// A check is a closure that probes once and says whether to go on (a readiness check stops at
/// its first ready answer). Its next run is due one interval after the previous one *began*, as
/// Marathon does; a probe that overruns its interval runs again as soon as it returns.
actor HealthScheduler {
    typealias Probe = @Sendable () async -> Bool

    private struct Check {
        let instance: String
        let interval: Duration
        let probe: Probe
    }

    private struct Due: Comparable {
        var at: ContinuousClock.Instant
        var key: UInt64
        static func < (lhs: Due, rhs: Due) -> Bool { lhs.at < rhs.at || (lhs.at == rhs.at && lhs.key < rhs.key) }
    }

    let concurrency: Int
    private var checks: [UInt64: Check] = [:]
    private var byInstance: [String: Set<UInt64>] = [:]
    private var heap = MinHeap<Due>()
    private var nextKey: UInt64 = 0
    private var inFlight = 0
    private var waiter: CheckedContinuation<Void, Never>?
    private var timer: Task<Void, Never>?
    private var loop: Task<Void, Never>?

    init(concurrency: Int = 64) {
        self.concurrency = max(1, concurrency)
    }

    /// How many checks are scheduled (for tests and `/metrics`).
    var scheduled: Int { checks.count }

    /// Schedules a check of an instance: first after `firstAfter`, then every `interval`.
    func schedule(instance: String, firstAfter: Duration, interval: Duration, probe: @escaping Probe) {
        let key = nextKey
        nextKey += 1
        checks[key] = Check(instance: instance, interval: max(interval, .milliseconds(1)), probe: probe)
        byInstance[instance, default: []].insert(key)
        heap.push(Due(at: .now + max(firstAfter, .zero), key: key))
        if loop == nil { loop = Task { await self.run() } }
        wake()
    }

    /// Forgets an instance's checks; a probe of it under way finishes, and is not run again.
    func cancel(instance: String) {
        for key in byInstance.removeValue(forKey: instance) ?? [] { checks[key] = nil }
    }

    func cancelAll() {
        checks.removeAll()
        byInstance.removeAll()
        heap = MinHeap()
    }

    func shutdown() {
        cancelAll()
        loop?.cancel()
        loop = nil
        wake()
    }

    private func run() async {
        while !Task.isCancelled {
            let now = ContinuousClock.now
            while inFlight < concurrency, let top = heap.peek, top.at <= now {
                heap.pop()
                guard let check = checks[top.key] else { continue }  // cancelled meanwhile
                inFlight += 1
                let key = top.key
                Task { [check] in
                    let goOn = await check.probe()
                    await self.finished(key, began: now, goOn: goOn)
                }
            }
            // Sleep until the next due check (unless every slot is busy: a finished probe wakes us).
            let until = inFlight < concurrency ? heap.peek?.at : nil
            await sleep(until: until)
        }
    }

    private func finished(_ key: UInt64, began: ContinuousClock.Instant, goOn: Bool) {
        inFlight -= 1
        if let check = checks[key] {
            if goOn {
                heap.push(Due(at: began + check.interval, key: key))
            } else {
                checks[key] = nil
                byInstance[check.instance]?.remove(key)
                if byInstance[check.instance]?.isEmpty == true { byInstance[check.instance] = nil }
            }
        }
        wake()
    }

    private func sleep(until deadline: ContinuousClock.Instant?) async {
        timer?.cancel()
        timer = nil
        if let deadline {
            timer = Task {
                try? await Task.sleep(until: deadline)
                if !Task.isCancelled { self.wake() }
            }
        }
        await withCheckedContinuation { waiter = $0 }
    }

    private func wake() {
        waiter?.resume()
        waiter = nil
    }
}

/// A binary min-heap.
struct MinHeap<Element: Comparable> {
    private var elements: [Element] = []

    var count: Int { elements.count }
    var peek: Element? { elements.first }

    mutating func push(_ element: Element) {
        elements.append(element)
        var child = elements.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard elements[child] < elements[parent] else { break }
            elements.swapAt(child, parent)
            child = parent
        }
    }

    @discardableResult
    mutating func pop() -> Element? {
        guard !elements.isEmpty else { return nil }
        elements.swapAt(0, elements.count - 1)
        let top = elements.removeLast()
        var parent = 0
        while true {
            let left = 2 * parent + 1, right = left + 1
            var smallest = parent
            if left < elements.count, elements[left] < elements[smallest] { smallest = left }
            if right < elements.count, elements[right] < elements[smallest] { smallest = right }
            guard smallest != parent else { break }
            elements.swapAt(parent, smallest)
            parent = smallest
        }
        return top
    }
}
