public import HummingbirdCore
import Logging
public import NIOCore
public import NIOHTTP1

/// Vault's clients list with the method `LIST` (hvac's `list_secrets`, `vault kv list`), which
/// SwiftNIO's HTTP/1 parser does not know: it answers 400 before any route sees the request.
/// Vault treats `LIST /p` and `GET /p?list=true` as the same request, so this channel rewrites the
/// one into the other in front of the parser.
///
/// The rewrite happens only where a request certainly starts: the first bytes of a connection,
/// or the first bytes after the parser ended a request and began no other. It changes only a
/// request line that is whole and well formed (`LIST /target HTTP/1.x`); anything else passes
/// untouched and meets the parser as before. A `LIST` pipelined behind another request in the
/// same read is not rewritten (the parser refuses it, as it did).
struct ListMethodChannel<Base: ServerChildChannel & HTTPChannelHandler>: ServerChildChannel, HTTPChannelHandler {
    typealias Value = Base.Value
    let base: Base

    var responder: HTTPChannelHandler.Responder { base.responder }

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        base.setup(channel: channel, logger: logger).flatMapThrowing { value in
            let operations = channel.pipeline.syncOperations
            let decoder = try operations.handler(type: ByteToMessageHandler<HTTPRequestDecoder>.self)
            let rewriter = ListMethodRewriter()
            try operations.addHandler(rewriter, position: .before(decoder))
            try operations.addHandler(RequestBoundaryObserver(rewriter: rewriter), position: .after(decoder))
            return value
        }
    }

    func handle(value: Value, logger: Logger) async {
        await base.handle(value: value, logger: logger)
    }
}

extension HTTPServerBuilder {
    /// HTTP/1.1 that also takes Vault's `LIST` method.
    public static func http1WithList(configuration: HTTP1Channel.Configuration = .init()) -> HTTPServerBuilder {
        .init { responder in ListMethodChannel(base: HTTP1Channel(responder: responder, configuration: configuration)) }
    }
}

/// Rewrites `LIST <target> HTTP/1.x` at a request's start into `GET <target>?list=true HTTP/1.x`.
public final class ListMethodRewriter: ChannelInboundHandler, RemovableChannelHandler {
    public init() {}

    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer

    /// The longest request line waited for; a longer one passes untouched (the parser's limits apply).
    public static let maximumLine = 16 * 1024
    private static let method: [UInt8] = Array("LIST ".utf8)

    /// The next byte read starts a request.
    var atRequestStart = true
    /// Bytes of a request line that may be a `LIST`, held until its end arrives.
    private var held: ByteBuffer?

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        guard atRequestStart || held != nil else {
            context.fireChannelRead(data)
            return
        }
        if var pending = held {
            pending.writeBuffer(&buffer)
            buffer = pending
            held = nil
        }
        atRequestStart = false
        switch Self.rewrite(buffer) {
        case .rewritten(let rewritten): context.fireChannelRead(wrapInboundOut(rewritten))
        case .unchanged: context.fireChannelRead(wrapInboundOut(buffer))
        case .needMore:
            held = buffer
            atRequestStart = true
        }
    }

    public func channelInactive(context: ChannelHandlerContext) {
        if let pending = held {
            held = nil
            context.fireChannelRead(wrapInboundOut(pending))
        }
        context.fireChannelInactive()
    }

    public enum Outcome: Equatable {
        case rewritten(ByteBuffer)
        case unchanged
        case needMore
    }

    /// What becomes of bytes that start a request.
    public static func rewrite(_ buffer: ByteBuffer) -> Outcome {
        let bytes = buffer.readableBytesView
        // A prefix of "LIST " may still become one.
        let start = bytes.prefix(method.count)
        guard start.elementsEqual(method.prefix(start.count)) else { return .unchanged }
        guard start.count == method.count else { return .needMore }
        guard let newline = bytes.firstIndex(of: UInt8(ascii: "\n")) else {
            return bytes.count > maximumLine ? .unchanged : .needMore
        }
        guard newline - bytes.startIndex <= maximumLine else { return .unchanged }
        // `LIST SP target SP HTTP/1.x CR LF`, exactly.
        let line = bytes[(bytes.startIndex + method.count)..<newline]
        guard line.last == UInt8(ascii: "\r") else { return .unchanged }
        let content = line.dropLast()
        guard let space = content.firstIndex(of: UInt8(ascii: " ")) else { return .unchanged }
        let target = content[..<space]
        let version = content[(space + 1)...]
        guard target.first == UInt8(ascii: "/"),
            !target.contains(where: { $0 <= 0x20 || $0 >= 0x7F || $0 == UInt8(ascii: "#") }),
            version.elementsEqual("HTTP/1.1".utf8) || version.elementsEqual("HTTP/1.0".utf8)
        else { return .unchanged }
        var out = ByteBufferAllocator().buffer(capacity: bytes.count + 16)
        out.writeString("GET ")
        out.writeBytes(target)
        out.writeString(target.contains(UInt8(ascii: "?")) ? "&list=true " : "?list=true ")
        out.writeBytes(version)
        out.writeBytes(bytes[(newline - 1)...])
        return .rewritten(out)
    }
}

/// Tells the rewriter where requests end, as the parser saw them: after a request's end and
/// before the next head, the next bytes read start a request.
public final class RequestBoundaryObserver: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = HTTPServerRequestPart
    public typealias InboundOut = HTTPServerRequestPart
    private let rewriter: ListMethodRewriter

    public init(rewriter: ListMethodRewriter) {
        self.rewriter = rewriter
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head: rewriter.atRequestStart = false
        case .end: rewriter.atRequestStart = true
        case .body: break
        }
        context.fireChannelRead(data)
    }
}
