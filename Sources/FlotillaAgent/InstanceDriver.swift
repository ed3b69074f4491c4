public import FlotillaCore
import Glibc

/// The process the agent supervises for one instance: what a driver started, or what it found
/// again after an agent restart. For `exec` it is the app's own process; for `oci` it is the
/// runtime (`runc run`) that waits for the container and exits with its status.
struct SupervisedProcess: Sendable {
    var pid: Int32
    /// With the pid, names one process for good (`/proc/<pid>/stat` field 22), so a restarted agent
    /// never adopts a stranger that reused the pid.
    var startTicks: UInt64
    /// A pidfd: signals go through it (no pid-reuse races) and the watcher waits on it for the exit.
    var signalFD: Int32
    /// The driver's notes, kept in the instance status (`driverState`): opaque to everyone else.
    var state: [String: String]
}

/// Runs instances one way (a plain process, an OCI container). The agent owns what every driver
/// shares: the sandbox and its log files, the instance's cgroup, exit watching, health checks,
/// draining and the stop sequence; a driver owns how an instance starts, what signalling it
/// means, and what is left to clean up after it.
protocol InstanceDriver: Sendable {
    /// The name apps need (`AppDefinition.driver`) and nodes advertise.
    var name: String { get }

    /// Why the driver cannot run instances on this node (a missing runtime), or nil when it can.
    func unavailableReason() -> String?

    /// Fetches what the instance needs before it can start (an image); may take long, and tells
    /// `progress` what it is doing in words an operator reads in `flotilla app`.
    /// Throws with a message fit for `lastTaskFailure`.
    func prepare(_ spec: InstanceSpec, progress: @escaping @Sendable (String) -> Void) async throws

    /// Starts the instance with its sandbox, logs and cgroup ready. Throws with a message fit for
    /// `lastTaskFailure`.
    func start(_ spec: InstanceSpec, context: LaunchContext) async throws -> SupervisedProcess

    /// Delivers a signal the way the driver means it: SIGTERM to the app's main process, SIGKILL to
    /// everything the instance runs.
    func signal(_ process: SupervisedProcess, instanceID: String, _ signal: Int32)

    /// After the supervised process ended, or to end an orphan: kills what is left and removes what
    /// the driver made (cgroup, mounts, runtime state). `state` is the recorded `driverState`.
    func cleanUp(instanceID: String, process: SupervisedProcess?, state: [String: String]) async

    /// Whether `prepare` has work to do (an image to pull), so the agent runs it in the background.
    func needsPreparation(_ spec: InstanceSpec) -> Bool

    /// Instances the driver still holds something of (a runtime's container records), for the
    /// agent to clean up after a restart when no process of theirs is left.
    func leftoverInstanceIDs() -> [String]

    /// The argument vector that runs a COMMAND health check's shell command for the instance.
    func commandArguments(for command: String, instanceID: String) -> [String]

}

/// What the agent hands a driver to start an instance with.
struct LaunchContext: Sendable {
    /// The instance's directory on the node: log files, fetched artifacts, the container's upper layer.
    var sandbox: String
    var logs: InstanceLogs
    /// The agent's own environment (for PATH, LANG and the like).
    var agentEnvironment: [String: String]
    /// The values of the app's secrets, by the names its `secrets` gives them; read at start,
    /// held only in memory and handed to the instance (env, files), never logged or stored.
    var secrets: [String: String] = [:]
    /// Variables the agent adds for this instance (its workload token), before the app's own `env`.
    var extraEnvironment: [String: String] = [:]
}

/// Tokens for instances (`FLOTILLA_TOKEN`): each instance gets one that allows what its own app
/// needs, and loses it when it ends.
public protocol WorkloadTokens: Sendable {
    func token(for spec: InstanceSpec) async throws -> String
    /// Revokes the tokens of these instances.
    func revoke(instances: Set<String>) async
    /// Revokes the tokens of every instance of this node not in `live`.
    func revoke(allBut live: Set<String>, node: String) async
}

/// Reads secret values for instances as they start (the secrets engine, over the shared store).
public protocol SecretValues: Sendable {
    /// The value `source` names. Errors name the source, never a value.
    func value(of source: SecretSource) async throws -> String
}

extension InstanceDriver {
    func unavailableReason() -> String? { nil }
    func prepare(_ spec: InstanceSpec, progress: @escaping @Sendable (String) -> Void) async throws {}
    func needsPreparation(_ spec: InstanceSpec) -> Bool { false }
    func leftoverInstanceIDs() -> [String] { [] }
    func commandArguments(for command: String, instanceID: String) -> [String] { ["/bin/sh", "-c", command] }
}

/// The environment every instance sees, whichever driver runs it: Marathon's variables, then the
/// app's own. `sandbox` is the sandbox's path as the instance sees it.
enum InstanceEnvironment {
    static func build(
        for spec: InstanceSpec, sandbox: String, agentEnvironment: [String: String], secrets: [String: String] = [:],
        extraEnvironment: [String: String] = [:]
    ) -> [String: String] {
        var environment: [String: String] = [:]
        for key in ["PATH", "LANG", "LC_ALL", "TZ"] { environment[key] = agentEnvironment[key] }
        environment["PATH"] = environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        environment["HOME"] = sandbox
        environment["HOST"] = spec.host
        environment["MESOS_SANDBOX"] = sandbox
        environment["FLOTILLA_APP_ID"] = spec.appID.path
        environment["FLOTILLA_INSTANCE_ID"] = spec.id
        environment["MARATHON_APP_ID"] = spec.appID.path
        environment["MARATHON_APP_VERSION"] = spec.version
        environment["MESOS_TASK_ID"] = spec.id
        for (key, value) in spec.definition.labels where isPortableName(key) {
            environment["MARATHON_APP_LABEL_" + key.uppercased()] = value
        }
        let appPorts = spec.definition.ports
        for (index, port) in spec.ports.enumerated() {
            environment["PORT\(index)"] = String(port)
            if let name = appPorts[safe: index]?.name, isPortableName(name) {
                environment["PORT_" + name.uppercased()] = String(port)
            }
            // Marathon: PORT_<containerPort> on a bridge, PORT_<requested port> on the host network.
            if let appPort = appPorts[safe: index] {
                let requested = appPort.containerPort ?? appPort.servicePort
                if requested != 0 { environment["PORT_\(requested)"] = String(port) }
            }
        }
        if let first = spec.ports.first { environment["PORT"] = String(first) }
        if !spec.ports.isEmpty { environment["PORTS"] = spec.ports.map(String.init).joined(separator: ",") }
        for (key, value) in extraEnvironment { environment[key] = value }
        for (key, value) in spec.definition.env {
            switch value {
            case .value(let text): environment[key] = text
            case .secret(let name): environment[key] = secrets[name]
            }
        }
        return environment
    }

    static func isPortableName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.allSatisfy { $0 == UInt8(ascii: "_") || isalnum(Int32($0)) != 0 }
    }
}
