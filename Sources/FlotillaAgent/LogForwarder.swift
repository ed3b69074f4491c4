public import FlotillaCore
import Foundation
public import Logging
public import Prometheus
public import ServiceLifecycle

/// `--log-forward`: sends every line this node's instances write to a syslog collector, as RFC 5424
/// messages with the line's origin in structured data (`SyslogMessage`).
///
/// It tails the instances' own files from behind (`LogTail`), so it never slows an instance, and
/// the files are its buffer: while the collector is down it keeps its place, holds rotated
/// generations open, and sends what it missed once the collector is back. It drops lines only when
/// what it holds passes `bufferBytes` (or rotation outran it) — the oldest first, counted, and
/// reported to the collector and in the agent's log. Its place is checkpointed in
/// `<data-dir>/log-forward/<target>.json` once a batch is delivered, so an agent restart resumes
/// there: a line can be sent twice only if it was in the last batch before a lost connection or a
/// crash.
public struct LogForwarder: Service {
    public struct Configuration: Sendable {
        public var target: LogForwardTarget
        /// What the forwarder may hold unsent (files rotated away, held open) before it drops the oldest.
        public var bufferBytes: UInt64
        public var node: String
        public var sandboxRoot: String
        public var dataDirectory: String

        public init(target: LogForwardTarget, bufferBytes: UInt64 = 64 << 20, node: String, sandboxRoot: String, dataDirectory: String) {
            self.target = target
            self.bufferBytes = bufferBytes
            self.node = node
            self.sandboxRoot = sandboxRoot
            self.dataDirectory = dataDirectory
        }
    }

    let configuration: Configuration
    let logger: Logger
    let linesSent: Counter
    let linesDropped: Counter
    let lagBytes: Gauge

    public init(configuration: Configuration, registry: PrometheusCollectorRegistry, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        let labels = [("target", configuration.target.description)]
        linesSent = registry.counter("flotilla_log_forward_lines_total", labels: labels, help: "Instance log lines sent to the syslog collector")
        linesDropped = registry.counter(
            "flotilla_log_forward_dropped_lines_total", labels: labels, help: "Instance log lines dropped before they could be forwarded")
        lagBytes = registry.gauge("flotilla_log_forward_lag_bytes", labels: labels, help: "Bytes instances wrote that are not yet forwarded")
    }

    /// How long a TCP connection must stay up after a batch before the batch counts as delivered.
    static let confirmDelay: Duration = .seconds(1)
    /// How often the forwarder looks for new lines when it has caught up.
    static let pollInterval: Duration = .milliseconds(250)
    /// Bytes of lines read per round.
    static let batchBytes = 1 << 20

    var checkpointPath: String {
        let name = configuration.target.description.map { $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" ? $0 : "_" }
        return configuration.dataDirectory + "/log-forward/" + String(name) + ".json"
    }

    public func run() async throws {
        var state = ForwardingState(configuration: configuration, checkpointPath: checkpointPath, logger: logger)
        state.loadCheckpoint()
        logger.info("forwarding instances' logs to \(configuration.target)")
        var sender: SyslogSender?
        var backoff: Duration = .milliseconds(250)
        var nextAttempt = ContinuousClock.now
        var failures = 0
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            state.discover()
            state.observe()
            if let current = sender, !current.isAlive {
                logger.warning("the connection to \(configuration.target) was lost; resending from the last delivered line")
                state.rewind()
                await current.close()
                sender = nil
                nextAttempt = .now + backoff
            }
            if sender == nil, ContinuousClock.now >= nextAttempt {
                do {
                    sender = try await SyslogSender.connect(to: configuration.target)
                    if failures > 0 { logger.notice("connected to \(configuration.target) again; sending what was held") }
                    failures = 0
                    backoff = .milliseconds(250)
                } catch {
                    failures += 1
                    if failures == 1 || failures % 20 == 0 {
                        logger.warning("cannot reach the log collector \(configuration.target) (\(error)); holding lines, retrying with backoff")
                    }
                    nextAttempt = .now + backoff
                    backoff = min(backoff * 2, .seconds(30))
                }
            }
            var sent = 0
            if let current = sender {
                state.confirm(olderThan: .now - (configuration.target.transport == .tcp ? Self.confirmDelay : .zero))
                if !state.overBound {
                    let batch = state.nextBatch(maxMessageBytes: current.maxMessageBytes)
                    if !batch.messages.isEmpty {
                        do {
                            try await current.send(batch.messages)
                            state.sent(at: .now)
                            sent = batch.lines
                            linesSent.increment(by: Int64(batch.lines))
                        } catch {
                            logger.warning("sending to \(configuration.target) failed (\(error)); resending from the last delivered line")
                            state.rewind()
                            await current.close()
                            sender = nil
                            nextAttempt = .now + backoff
                        }
                    }
                }
            }
            let dropped = state.enforceBound()
            if dropped.lines > 0 || dropped.bytes > 0 {
                linesDropped.increment(by: Int64(dropped.lines))
                logger.warning(
                    "log forwarding dropped \(dropped.lines) lines (\(dropped.bytes) bytes): more than --log-forward-buffer was waiting for \(configuration.target)")
            }
            lagBytes.set(Double(state.lag))
            state.saveCheckpointIfDue()
            if sent == 0 {
                try? await cancelWhenGracefulShutdown { try await Task.sleep(for: Self.pollInterval) }
            }
        }
        if let sender {
            try? await Task.sleep(for: configuration.target.transport == .tcp ? Self.confirmDelay : .zero)
            if sender.isAlive { state.confirm(olderThan: .now) }
            await sender.close()
        }
        state.saveCheckpoint()
    }
}

/// The forwarder's tails: `tails` as read ahead, `delivered` as of the last delivered batch (where
/// a lost connection goes back to, and what the checkpoint saves), and the batches in between.
struct ForwardingState {
    let configuration: LogForwarder.Configuration
    let checkpointPath: String
    let logger: Logger
    var tails: [String: LogTail] = [:]
    var delivered: [String: LogTail] = [:]
    /// Batches written but not yet confirmed, with the tails after each.
    var unconfirmed: [(at: ContinuousClock.Instant, tails: [String: LogTail])] = []
    var saved: [String: LogTail.Position] = [:]
    var checkpoint: [String: LogTail.Position] = [:]
    /// No checkpoint yet: files already there start at their end (turning forwarding on does not
    /// replay a node's history); files that appear later start at their beginning.
    var firstRun = false
    var lastDiscovery = ContinuousClock.Instant.now - .seconds(60)
    var lastSave = ContinuousClock.Instant.now

    init(configuration: LogForwarder.Configuration, checkpointPath: String, logger: Logger) {
        self.configuration = configuration
        self.checkpointPath = checkpointPath
        self.logger = logger
    }

    struct CheckpointFile: Codable {
        var target: String
        var files: [String: LogTail.Position]
    }

    mutating func loadCheckpoint() {
        if let data = FileManager.default.contents(atPath: checkpointPath), let file = try? JSONDecoder().decode(CheckpointFile.self, from: data) {
            checkpoint = file.files
            saved = file.files
        } else {
            firstRun = true
        }
        discover()
        firstRun = false
        saveCheckpoint()
    }

    /// Finds the streams of sandboxes that appeared, and forgets those removed and read to their end.
    mutating func discover() {
        guard ContinuousClock.now - lastDiscovery >= .seconds(1) else { return }
        lastDiscovery = .now
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: configuration.sandboxRoot)) ?? [] {
            guard let app = LogLine.appID(ofInstance: entry) else { continue }
            for stream in LogStream.allCases {
                let key = entry + "/" + stream.rawValue
                guard tails[key] == nil else { continue }
                var tail = LogTail(instance: entry, app: app, stream: stream, sandbox: configuration.sandboxRoot + "/" + entry)
                guard FileManager.default.fileExists(atPath: tail.path) || checkpoint[key] != nil else { continue }
                if let position = checkpoint.removeValue(forKey: key) {
                    tail.resume(from: position)
                } else if firstRun {
                    tail.skipToEnd()
                } else {
                    tail.observe()
                }
                tails[key] = tail
                delivered[key] = tail
                for batch in unconfirmed.indices { unconfirmed[batch].tails[key] = tail }
            }
        }
        // Positions of sandboxes removed while the agent was down are of no more use.
        for key in checkpoint.keys where !FileManager.default.fileExists(atPath: configuration.sandboxRoot + "/" + key.split(separator: "/")[0]) {
            checkpoint[key] = nil
        }
        for (key, tail) in delivered where tail.finished && tails[key]?.finished ?? true && unconfirmed.isEmpty {
            delivered[key] = nil
            tails[key] = nil
        }
    }

    /// Notices rotations in both views, so that each holds the generations it still needs.
    mutating func observe() {
        for key in tails.keys { tails[key]!.observe() }
        for key in delivered.keys { delivered[key]!.observe() }
    }

    /// The next messages: each tail's notice of dropped lines, then its lines, oldest tails first
    /// (by what they hold), up to `LogForwarder.batchBytes`.
    mutating func nextBatch(maxMessageBytes: Int) -> (messages: [[UInt8]], lines: Int) {
        var messages: [[UInt8]] = []
        var lines = 0
        var budget = LogForwarder.batchBytes
        let now = Int64((Date().timeIntervalSince1970 * 1000).rounded(.down))
        for key in tails.keys.sorted() where budget > 0 {
            var tail = tails[key]!
            if tail.droppedLines > 0 || tail.droppedBytes > 0 {
                messages.append(Self.dropNotice(of: tail, node: configuration.node, now: now).serialized(maxBytes: maxMessageBytes))
                tail.droppedLines = 0
                tail.droppedBytes = 0
            }
            for line in tail.read(budget: budget, now: now) {
                budget -= line.text.count + 1
                messages.append(Self.message(line.text, millis: line.millis, of: tail, node: configuration.node).serialized(maxBytes: maxMessageBytes))
                lines += 1
            }
            tails[key] = tail
        }
        return (messages, lines)
    }

    static func message(_ text: [UInt8], millis: Int64, of tail: LogTail, node: String) -> SyslogMessage {
        SyslogMessage(
            severity: tail.stream == .stderr ? .error : .informational, millis: millis, hostname: node, appName: SyslogMessage.appName(of: tail.app),
            processID: tail.instance, structuredData: [origin(of: tail, node: node, extra: [])], text: text)
    }

    static func dropNotice(of tail: LogTail, node: String, now: Int64) -> SyslogMessage {
        let text = "flotilla dropped \(tail.droppedLines) lines (\(tail.droppedBytes) bytes) of this stream before they could be forwarded"
        return SyslogMessage(
            severity: .warning, millis: now, hostname: node, appName: SyslogMessage.appName(of: tail.app), processID: tail.instance,
            structuredData: [
                origin(of: tail, node: node, extra: [("dropped-lines", "\(tail.droppedLines)"), ("dropped-bytes", "\(tail.droppedBytes)")])
            ],
            text: Array(text.utf8))
    }

    static func origin(of tail: LogTail, node: String, extra: [(name: String, value: String)]) -> SyslogMessage.StructuredData {
        SyslogMessage.StructuredData(
            id: SyslogMessage.structuredDataID,
            parameters: [("app", tail.app), ("instance", tail.instance), ("node", node), ("stream", tail.stream.rawValue)] + extra)
    }

    /// The batch just built was written.
    mutating func sent(at time: ContinuousClock.Instant) {
        unconfirmed.append((time, tails))
    }

    /// Batches written before `time` on a connection still up count as delivered.
    mutating func confirm(olderThan time: ContinuousClock.Instant) {
        while let first = unconfirmed.first, first.at <= time {
            delivered = first.tails
            unconfirmed.removeFirst()
        }
    }

    /// The connection was lost: what was not confirmed is read (and sent) again.
    mutating func rewind() {
        unconfirmed.removeAll()
        tails = delivered
    }

    var lag: UInt64 { tails.values.reduce(0) { $0 + $1.lag } }

    /// Over the bound, nothing new is sent until the batches out are confirmed (then `enforceBound` can drop).
    var overBound: Bool { !unconfirmed.isEmpty && delivered.values.reduce(0) { $0 + $1.lag } > configuration.bufferBytes }

    /// While more than the bound waits, drops the oldest held generations (then the oldest unread
    /// part of current files), counting their lines for the next notice.
    mutating func enforceBound() -> (lines: Int, bytes: UInt64) {
        guard unconfirmed.isEmpty else { return (0, 0) }
        var total = delivered.values.reduce(UInt64(0)) { $0 + $1.lag }
        var dropped = (lines: 0, bytes: UInt64(0))
        while total > configuration.bufferBytes {
            guard let key = delivered.keys.max(by: { delivered[$0]!.lag < delivered[$1]!.lag }) else { break }
            var tail = delivered[key]!
            let removed = tail.dropOldest() ?? tail.dropCurrent(upTo: total - configuration.bufferBytes)
            delivered[key] = tail
            guard removed.bytes > 0 else { break }
            dropped.lines += removed.lines
            dropped.bytes += removed.bytes
            total -= min(total, removed.bytes)
        }
        if dropped.bytes > 0 { tails = delivered }
        return dropped
    }

    mutating func saveCheckpointIfDue() {
        guard ContinuousClock.now - lastSave >= .seconds(1) else { return }
        saveCheckpoint()
    }

    /// Writes where each stream's delivered lines end (with the positions of streams not yet found again).
    mutating func saveCheckpoint() {
        lastSave = .now
        var positions = checkpoint
        for (key, tail) in delivered { positions[key] = tail.position }
        guard positions != saved else { return }
        do {
            try FileManager.default.createDirectory(atPath: (checkpointPath as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            let data = try JSONEncoder().encode(CheckpointFile(target: configuration.target.description, files: positions))
            try data.write(to: URL(fileURLWithPath: checkpointPath), options: .atomic)
            saved = positions
        } catch {
            logger.warning("cannot save the log forwarding checkpoint \(checkpointPath): \(error)")
        }
    }
}
