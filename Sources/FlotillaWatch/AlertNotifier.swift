public import AsyncHTTPClient
public import FlotillaCore
public import Foundation
public import Logging
import NIOCore
import NIOFoundationCompat
import NIOHTTP1

/// Tells the outside about alerts: each level change to every webhook (`--alert-webhook`), in
/// order, retried with backoff; and the firing alerts to every Alertmanager (`--alertmanager`,
/// `POST /api/v2/alerts`), sent again while they fire so that Alertmanager keeps them, and sent
/// once more with `endsAt` when they end.
///
/// Alertmanager tells alerts apart by their labels, `severity` among them: an alert that goes
/// from warning to critical ends its warning alert and starts a critical one.
public actor AlertNotifier {
    public struct Configuration: Sendable {
        public var webhooks: [String]
        public var alertmanagers: [String]
        /// Where a person can see the alert (`generatorURL`): this agent's API.
        public var apiBase: String
        public var node: String
        /// Firing alerts are posted to Alertmanager again this often.
        public var resendInterval: Double = 30
        /// How long Alertmanager keeps an alert that is not sent again (a node that died).
        public var endsAfter: Double = 300
        /// Webhook deliveries waiting per webhook; past it the oldest go (and are counted).
        public var queueLimit = 1000
        /// Delays between attempts of one webhook delivery.
        public var retryDelays: [Double] = [0.5, 1, 2, 4, 8, 16]

        public init(webhooks: [String], alertmanagers: [String], apiBase: String, node: String) {
            self.webhooks = webhooks
            self.alertmanagers = alertmanagers
            self.apiBase = apiBase
            self.node = node
        }
    }

    struct FiringKey: Hashable {
        var subject: String
        var alert: String
        var severity: AlertLevel
    }

    struct Firing {
        var status: AlertStatus
        var startsAt: Date
    }

    private let configuration: Configuration
    private let client: HTTPClient
    private let logger: Logger
    private var firing: [FiringKey: Firing] = [:]
    private var ended: [FiringKey: Firing] = [:]
    private var lastPost = Date.distantPast
    private var queues: [String: [Data]] = [:]
    private var draining: Set<String> = []
    /// Deliveries dropped because a webhook's queue was full, by webhook.
    public private(set) var dropped: [String: Int] = [:]
    /// Deliveries that a webhook accepted, by webhook (for `flotilla alerts` and tests).
    public private(set) var delivered: [String: Int] = [:]

    public init(configuration: Configuration, client: HTTPClient, logger: Logger) {
        self.configuration = configuration
        self.client = client
        self.logger = logger
    }

    /// Whether there is anyone to notify.
    public nonisolated var isEnabledNow: Bool { !configuration.webhooks.isEmpty || !configuration.alertmanagers.isEmpty }

    // MARK: - Level changes

    /// An alert changed level.
    public func changed(_ status: AlertStatus, previous: AlertLevel, at now: Date = Date()) {
        if previous != .ok {
            let key = FiringKey(subject: status.subject, alert: status.alert, severity: previous)
            if let was = firing.removeValue(forKey: key) { ended[key] = was }
        }
        if status.state != .ok {
            firing[FiringKey(subject: status.subject, alert: status.alert, severity: status.state)] = Firing(status: status, startsAt: now)
        }
        lastPost = .distantPast  // post at the next round
        guard !configuration.webhooks.isEmpty else { return }
        let payload = WebhookPayload(status: status, previous: previous, at: Timestamp.format(now), node: configuration.node)
        guard let body = try? JSONEncoder.sorted.encode(payload) else { return }
        for webhook in configuration.webhooks { enqueue(body, to: webhook) }
    }

    /// Every round: the firing alerts' latest values, and posts to Alertmanager when something
    /// changed or the resend interval has passed.
    public func round(active: [AlertStatus], at now: Date = Date()) {
        for status in active {
            let key = FiringKey(subject: status.subject, alert: status.alert, severity: status.state)
            firing[key]?.status = status
        }
        // Alerts whose rule went (the app was removed or changed): end them.
        let live = Set(active.map { FiringKey(subject: $0.subject, alert: $0.alert, severity: $0.state) })
        for key in firing.keys where !live.contains(key) { ended[key] = firing.removeValue(forKey: key) }
        guard !configuration.alertmanagers.isEmpty else { return }
        guard !ended.isEmpty || now.timeIntervalSince(lastPost) >= configuration.resendInterval else { return }
        guard !firing.isEmpty || !ended.isEmpty else { return }
        lastPost = now
        var alerts = firing.map { key, entry in postable(key, entry, endsAt: now.addingTimeInterval(configuration.endsAfter)) }
        alerts += ended.map { key, entry in postable(key, entry, endsAt: now) }
        ended = [:]
        guard let body = try? JSONEncoder.sorted.encode(alerts) else { return }
        for base in configuration.alertmanagers {
            Task { await self.postToAlertmanager(body, base: base) }
        }
    }

    // MARK: - Alertmanager

    struct PostableAlert: Encodable {
        var labels: [String: String]
        var annotations: [String: String]
        var startsAt: String
        var endsAt: String
        var generatorURL: String
    }

    private func postable(_ key: FiringKey, _ entry: Firing, endsAt: Date) -> PostableAlert {
        let status = entry.status
        let value = status.value.map(Self.number) ?? "no data"
        let threshold = (key.severity == .critical ? status.critical : status.warning).map(Self.number) ?? "?"
        var labels = ["alertname": status.alert, "severity": key.severity.rawValue, "metric": status.metric, "scope": status.scope, "source": "flotilla"]
        if let app = status.app { labels["app"] = app }
        if let node = status.node { labels["node"] = node }
        let query = status.app.map { "?app=" + ($0.addingPercentEncoding(withAllowedCharacters: .urlQueryAllowed) ?? $0) } ?? "?scope=" + status.scope
        return PostableAlert(
            labels: labels,
            annotations: [
                "summary": "\(status.subject): \(status.alert) is \(key.severity.rawValue)",
                "description": "\(status.metric) over \(GoDuration.format(status.windowSeconds)) is \(value) (\(key.severity.rawValue) at \(threshold))",
            ],
            startsAt: Timestamp.format(entry.startsAt), endsAt: Timestamp.format(endsAt),
            generatorURL: configuration.apiBase + "/flotilla/v1/alerts" + query)
    }

    private func postToAlertmanager(_ body: Data, base: String) async {
        let url = base.hasSuffix("/") ? base + "api/v2/alerts" : base + "/api/v2/alerts"
        for (attempt, delay) in ([0] + configuration.retryDelays.prefix(3)).enumerated() {
            if delay > 0 { try? await Task.sleep(for: .seconds(delay)) }
            do {
                let status = try await post(body, to: url)
                if (200..<300).contains(status) { return }
                logger.warning("Alertmanager \(url) answered \(status) (attempt \(attempt + 1))")
                if (400..<500).contains(status) { return }  // it will not take it later either
            } catch {
                logger.warning("Alertmanager \(url) did not answer: \(error) (attempt \(attempt + 1))")
            }
        }
    }

    // MARK: - Webhooks

    struct WebhookPayload: Encodable {
        var status: AlertStatus
        var previous: AlertLevel
        var at: String
        var node: String

        enum CodingKeys: String, CodingKey { case scope, app, node, alert, metric, state, previous, value, threshold, warning, critical, windowSeconds, since, at, agent }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(status.scope, forKey: .scope)
            try container.encodeIfPresent(status.app, forKey: .app)
            try container.encodeIfPresent(status.node, forKey: .node)
            try container.encode(status.alert, forKey: .alert)
            try container.encode(status.metric, forKey: .metric)
            try container.encode(status.state, forKey: .state)
            try container.encode(previous, forKey: .previous)
            try container.encodeIfPresent(status.value, forKey: .value)
            try container.encodeIfPresent(status.threshold ?? (previous == .critical ? status.critical : previous == .warning ? status.warning : nil), forKey: .threshold)
            try container.encodeIfPresent(status.warning, forKey: .warning)
            try container.encodeIfPresent(status.critical, forKey: .critical)
            try container.encode(status.windowSeconds, forKey: .windowSeconds)
            try container.encode(status.since, forKey: .since)
            try container.encode(at, forKey: .at)
            try container.encode(node, forKey: .agent)
        }
    }

    private func enqueue(_ body: Data, to webhook: String) {
        var queue = queues[webhook, default: []]
        queue.append(body)
        if queue.count > configuration.queueLimit {
            let excess = queue.count - configuration.queueLimit
            // The first may be on its way: the oldest after it go.
            let first = draining.contains(webhook) ? 1 : 0
            queue.removeSubrange(first..<(first + excess))
            dropped[webhook, default: 0] += excess
            logger.warning("alert webhook \(webhook) is behind: dropped \(excess) notification(s), \(dropped[webhook]!) in all")
        }
        queues[webhook] = queue
        if draining.insert(webhook).inserted {
            Task { await self.drain(webhook) }
        }
    }

    /// Delivers a webhook's queue in order, one at a time; a delivery that keeps failing is given
    /// up after the last retry (and logged), and the next goes.
    private func drain(_ webhook: String) async {
        while let body = queues[webhook]?.first {
            var done = false
            for (attempt, delay) in ([0] + configuration.retryDelays).enumerated() where !done {
                if delay > 0 { try? await Task.sleep(for: .seconds(delay)) }
                do {
                    let status = try await post(body, to: webhook)
                    if (200..<300).contains(status) {
                        done = true
                    } else {
                        logger.warning("alert webhook \(webhook) answered \(status) (attempt \(attempt + 1))")
                    }
                } catch {
                    logger.warning("alert webhook \(webhook) did not answer: \(error) (attempt \(attempt + 1))")
                }
            }
            if done { delivered[webhook, default: 0] += 1 } else { logger.error("alert webhook \(webhook): gave up on a notification after \(configuration.retryDelays.count + 1) attempts") }
            if queues[webhook]?.isEmpty == false { queues[webhook]!.removeFirst() }
        }
        draining.remove(webhook)
    }

    private func post(_ body: Data, to url: String) async throws -> UInt {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.headers.add(name: "User-Agent", value: "flotilla")
        request.body = .bytes(ByteBuffer(data: body))
        let response = try await client.execute(request, timeout: .seconds(5))
        _ = try? await response.body.collect(upTo: 1 << 20)
        return response.status.code
    }

    static func number(_ value: Double) -> String {
        if value == value.rounded(), abs(value) < 1e15 { return String(Int64(value)) }
        return String(format: "%.4g", value)
    }
}

extension JSONEncoder {
    static var sorted: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return encoder
    }
}
