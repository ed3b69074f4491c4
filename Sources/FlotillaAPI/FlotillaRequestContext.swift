public import Hummingbird
public import NIOCore

/// The request context every Flotilla route sees: Hummingbird's core context plus the client's
/// address (Marathon's events name it: `clientIp`, `remoteAddress`).
public struct FlotillaRequestContext: RequestContext, RemoteAddressRequestContext {
    public var coreContext: CoreRequestContextStorage
    public let remoteAddress: SocketAddress?

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        remoteAddress = source.channel.remoteAddress
    }
}

extension RequestContext {
    /// The client's IP address as text, or "" when the context does not know it.
    var remoteAddressText: String {
        (self as? any RemoteAddressRequestContext)?.remoteAddress?.ipAddress ?? ""
    }
}
