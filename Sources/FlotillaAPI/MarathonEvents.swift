public import FlotillaCore
public import Foundation

/// One event as Marathon's clients read it: its `eventType` and fields (with `eventType` and
/// `timestamp` among them), for `/v2/events` and the HTTP callbacks.
public struct MarathonEvent: Sendable, Hashable {
    public var type: String
    public var fields: [String: JSONValue]

    public init(type: String, fields: [String: JSONValue], timestamp: Date = Date()) {
        self.type = type
        var fields = fields
        fields["eventType"] = .string(type)
        fields["timestamp"] = .string(Timestamp.format(timestamp))
        self.fields = fields
    }

    /// The Marathon event for what happened, stamped with when it happened.
    public init(_ published: PublishedEvent) {
        let (type, fields) = Self.render(published.event)
        self.init(type: type, fields: fields, timestamp: published.at)
    }

    static func render(_ event: ControlEvent) -> (String, [String: JSONValue]) {
        switch event {
        case .apiPost(let definition, let clientIP, let uri):
            return ("api_post_event", [
                "clientIp": clientIP.map(JSONValue.string) ?? .null, "uri": .string(uri),
                "appDefinition": (try? JSONValue(encoding: definition)) ?? .null,
            ])
        case .deploymentInfo(let deployment, let original, let target):
            let step: JSONValue = .object(["actions": .array(deployment.currentActions.map(action))])
            return ("deployment_info", ["plan": plan(deployment, original: original, target: target), "currentStep": step])
        case .deploymentStepSuccess(let deployment, let step):
            return ("deployment_step_success", stepFields(deployment, step: step))
        case .deploymentStepFailure(let deployment, let step):
            return ("deployment_step_failure", stepFields(deployment, step: step))
        case .deploymentSuccess(let deployment):
            return ("deployment_success", ["id": .string(deployment.id), "plan": plan(deployment, original: [], target: [])])
        case .deploymentFailed(let deployment, let reason):
            return ("deployment_failed", ["id": .string(deployment.id), "plan": plan(deployment, original: [], target: []), "reason": .string(reason)])
        case .appTerminated(let app):
            return ("app_terminated_event", ["appId": .string(app.path)])
        case .statusUpdate(let spec, let status):
            return ("status_update_event", [
                "slaveId": .string(spec.node), "taskId": .string(spec.id), "taskStatus": .string(status.state.rawValue),
                "message": .string(status.message ?? ""), "appId": .string(spec.appID.path), "host": .string(spec.host),
                "ipAddresses": .array([.object(["ipAddress": .string(spec.host), "protocol": .string("IPv4")])]),
                "ports": .array(spec.ports.map { .number(Double($0)) }), "version": .string(spec.version),
            ])
        case .instanceChanged(let spec, let condition, let draining):
            return ("instance_changed_event", [
                "instanceId": .string(spec.id), "condition": .string(condition), "runSpecId": .string(spec.appID.path),
                "agentId": .string(spec.node), "host": .string(spec.host), "runSpecVersion": .string(spec.version),
                "inService": .bool(!spec.standby && !draining), "draining": .bool(draining),
            ])
        case .instanceHealthChanged(let spec, let healthy):
            return ("instance_health_changed_event", [
                "instanceId": .string(spec.id), "runSpecId": .string(spec.appID.path), "runSpecVersion": .string(spec.version),
                "healthy": healthy.map(JSONValue.bool) ?? .null,
            ])
        case .healthStatusChanged(let spec, let alive):
            return ("health_status_changed_event", [
                "appId": .string(spec.appID.path), "taskId": .string(spec.id), "instanceId": .string(spec.id),
                "version": .string(spec.version), "alive": .bool(alive),
            ])
        case .failedHealthCheck(let spec, let index):
            let checks = spec.definition.healthChecks
            let check = checks.indices.contains(index) ? (try? JSONValue(encoding: checks[index])) ?? .null : .null
            return ("failed_health_check_event", [
                "appId": .string(spec.appID.path), "taskId": .string(spec.id), "instanceId": .string(spec.id), "healthCheck": check,
            ])
        case .unhealthyTaskKill(let spec, let reason):
            return ("unhealthy_task_kill_event", [
                "appId": .string(spec.appID.path), "taskId": .string(spec.id), "instanceId": .string(spec.id), "version": .string(spec.version),
                "reason": .string(reason), "host": .string(spec.host), "slaveId": .string(spec.node),
            ])
        case .groupChangeSuccess(let id, let version):
            return ("group_change_success", ["groupId": .string(id.path), "version": .string(version)])
        case .eventStreamAttached(let address):
            return ("event_stream_attached", ["remoteAddress": .string(address)])
        case .eventStreamDetached(let address):
            return ("event_stream_detached", ["remoteAddress": .string(address)])
        case .subscriptionChanged(let url, let clientIP, let subscribed):
            return (subscribed ? "subscribe_event" : "unsubscribe_event", ["clientIp": .string(clientIP), "callbackUrl": .string(url)])
        case .alertChanged(let status, let previous):
            var fields: [String: JSONValue] = [:]
            if case .object(let object)? = try? JSONValue(encoding: status) { fields = object }
            if let app = status.app { fields["appId"] = .string(app) }
            fields["previous"] = .string(previous.rawValue)
            return ("alert_state_changed_event", fields)
        case .autoscaled(let app, let from, let to, let reason, let metric, let value, let target, let deployment):
            return ("autoscale_event", [
                "appId": .string(app), "from": .number(Double(from)), "to": .number(Double(to)), "reason": .string(reason),
                "metric": .string(metric), "value": value.map(JSONValue.number) ?? .null, "target": .number(target),
                "deploymentId": .string(deployment),
            ])
        }
    }

    static func plan(_ deployment: Deployment, original: [AppRecord], target: [AppRecord]) -> JSONValue {
        func group(_ records: [AppRecord]) -> JSONValue {
            .object([
                "id": .string("/"), "apps": .array(records.compactMap { try? JSONValue(encoding: $0.definition) }),
                "groups": .array([]), "dependencies": .array([]), "version": .string(deployment.version),
            ])
        }
        return .object([
            "id": .string(deployment.id), "version": .string(deployment.version),
            "original": group(original), "target": group(target),
            "steps": .array(deployment.steps.map { .object(["actions": .array($0.map(action))]) }),
        ])
    }

    static func stepFields(_ deployment: Deployment, step: Int) -> [String: JSONValue] {
        let actions = deployment.steps.indices.contains(step - 1) ? deployment.steps[step - 1] : []
        return ["plan": plan(deployment, original: [], target: []), "currentStep": .object(["actions": .array(actions.map(action))])]
    }

    static func action(_ action: Deployment.Action) -> JSONValue {
        .object(["action": .string(action.action.rawValue), "app": .string(action.app.path)])
    }
}
