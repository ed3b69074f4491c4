import Foundation

/// Placeholder until the bridge lands: bridge networking refuses clearly.
final class BridgeNetwork: Sendable {
    struct Attachment { var namespacePath: String; var address: String }
    func attach(instanceID: String, portMappings: [(hostPort: Int, containerPort: Int)]) throws -> Attachment {
        throw AgentError.launch("container/bridge networking is not available on this agent yet")
    }
    func detach(instanceID: String) {}
    static func containerResolvConf(hostResolvConf: String) -> String { hostResolvConf }
}
