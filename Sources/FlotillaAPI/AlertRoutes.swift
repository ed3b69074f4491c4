public import FlotillaControl
public import FlotillaCore
public import Hummingbird

/// `GET /flotilla/v1/alerts[?app=ID][&state=ok|warning|critical|firing]`: every alert rule's
/// state, value and thresholds, as the leader evaluates them (a follower forwards the request).
public struct AlertRoutes: Sendable {
    public typealias Statuses = @Sendable (String?) async -> [AlertStatus]

    let control: ControlPlane
    let statuses: Statuses

    public init(control: ControlPlane, statuses: @escaping Statuses) {
        self.control = control
        self.statuses = statuses
    }

    struct Answer: Codable, Sendable {
        var alerts: [AlertStatus]
    }

    public func add<Context: RequestContext>(to router: Router<Context>) {
        router.get("/flotilla/v1/alerts") { request, _ in
            await FlotillaRoutes.handle {
                var app: String?
                if let text = request.uri.queryParameters["app"].map(String.init) {
                    let id = try StatsRoutes.appID(text)
                    guard await control.snapshot().apps[id] != nil else { throw FlotillaError.notFound("App '\(id.path)' does not exist") }
                    app = id.path
                }
                var alerts = await statuses(app)
                if let state = request.uri.queryParameters["state"].map(String.init) {
                    switch state {
                    case "firing": alerts = alerts.filter { $0.state != .ok }
                    case "ok", "warning", "critical": alerts = alerts.filter { $0.state.rawValue == state }
                    default: throw FlotillaError.badRequest("state must be ok, warning, critical or firing, got '\(state)'")
                    }
                }
                return try APIResponse.encoded(Answer(alerts: alerts))
            }
        }
    }
}
