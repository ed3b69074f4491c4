import Foundation
import Synchronization

/// The node's bridge as the OCI driver uses it: made (and its nft table installed) the first time
/// a bridged container starts, not when the agent starts, so an agent that runs no bridged
/// container never touches the host's networking.
final class ContainerBridge: Sendable {
    let network: BridgeNetwork
    private let prepared = Mutex(false)

    init(network: BridgeNetwork) {
        self.network = network
    }

    func attach(instanceID: String, mappings: [BridgePortMapping]) throws -> BridgeAttachment {
        try prepared.withLock { done in
            if !done {
                try network.prepare()
                done = true
            }
        }
        do {
            return try network.attach(instanceID: instanceID, mappings: mappings)
        } catch {
            throw AgentError.launch("cannot attach the container to the bridge: \(error)")
        }
    }

    func detach(instanceID: String) {
        try? network.detach(instanceID: instanceID)
    }

    /// Instances that still hold an address, namespace or port mapping on the bridge.
    func attachedInstanceIDs() -> [String] { Array(network.attachments().keys) }

    /// What a bridged container gets as /etc/resolv.conf: the host's, unless its nameservers are
    /// loopback addresses the container cannot reach (systemd-resolved and the like).
    static func resolvConf(hostResolvConf: String) -> String {
        BridgeNetwork.resolvConfSuggestion(hostResolvConf: hostResolvConf).content ?? hostResolvConf
    }
}
