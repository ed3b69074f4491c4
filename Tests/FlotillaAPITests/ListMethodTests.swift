import FlotillaAPI
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing

@Suite struct ListMethodTests {
    func rewrite(_ text: String) -> String? {
        switch ListMethodRewriter.rewrite(ByteBuffer(string: text)) {
        case .rewritten(let buffer): return String(buffer: buffer)
        case .unchanged: return "unchanged"
        case .needMore: return nil
        }
    }

    @Test func aWholeListRequestLineBecomesAGetWithListTrue() {
        #expect(rewrite("LIST /v1/secret/metadata/shop HTTP/1.1\r\nHost: a\r\n\r\n") == "GET /v1/secret/metadata/shop?list=true HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(rewrite("LIST /v1/secret/metadata/?token=x HTTP/1.0\r\n\r\n") == "GET /v1/secret/metadata/?token=x&list=true HTTP/1.0\r\n\r\n")
    }

    @Test func otherRequestsAndMalformedLinesPassUntouched() {
        #expect(rewrite("GET /v1/sys/health HTTP/1.1\r\n\r\n") == "unchanged")
        #expect(rewrite("LISTEN / HTTP/1.1\r\n\r\n") == "unchanged")
        #expect(rewrite("LIST  /a HTTP/1.1\r\n\r\n") == "unchanged")  // two spaces
        #expect(rewrite("LIST /a HTTP/2.0\r\n\r\n") == "unchanged")
        #expect(rewrite("LIST /a HTTP/1.1\n\n") == "unchanged")  // no CR
        #expect(rewrite("LIST a HTTP/1.1\r\n\r\n") == "unchanged")  // not origin-form
        #expect(rewrite("LIST /a\u{7F}b HTTP/1.1\r\n\r\n") == "unchanged")
        #expect(rewrite("LIST /a#f HTTP/1.1\r\n\r\n") == "unchanged")
        #expect(rewrite("LIST /" + String(repeating: "a", count: ListMethodRewriter.maximumLine) + " HTTP/1.1\r\n") == "unchanged")
    }

    @Test func aLineNotYetWholeIsWaitedFor() {
        #expect(rewrite("L") == nil)
        #expect(rewrite("LIST") == nil)
        #expect(rewrite("LIST /v1/secret/metadata/sh") == nil)
        #expect(rewrite("X") == "unchanged")
    }

    /// The rewriter in front of SwiftNIO's own parser, as the server runs it.
    func channel() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        let rewriter = ListMethodRewriter()
        let decoder = ByteToMessageHandler(HTTPRequestDecoder())
        try channel.pipeline.syncOperations.addHandler(rewriter)
        try channel.pipeline.syncOperations.addHandler(decoder)
        try channel.pipeline.syncOperations.addHandler(RequestBoundaryObserver(rewriter: rewriter))
        return channel
    }

    func parts(_ channel: EmbeddedChannel) throws -> [HTTPServerRequestPart] {
        var parts: [HTTPServerRequestPart] = []
        while let part = try channel.readInbound(as: HTTPServerRequestPart.self) { parts.append(part) }
        return parts
    }

    func heads(_ parts: [HTTPServerRequestPart]) -> [String] {
        parts.compactMap { if case .head(let head) = $0 { "\(head.method.rawValue) \(head.uri)" } else { nil } }
    }

    @Test func everyRequestOfAKeptAliveConnectionIsSeen() throws {
        let channel = try channel()
        try channel.writeInbound(ByteBuffer(string: "LIST /v1/secret/metadata/a HTTP/1.1\r\nHost: x\r\n\r\n"))
        #expect(heads(try parts(channel)) == ["GET /v1/secret/metadata/a?list=true"])
        try channel.writeInbound(ByteBuffer(string: "POST /v1/secret/data/b HTTP/1.1\r\nHost: x\r\nContent-Length: 34\r\n\r\n"))
        // A body that looks like a LIST request line is a body.
        try channel.writeInbound(ByteBuffer(string: "LIST /v1/secret/metadata/ HTTP/1.1"))
        let post = try parts(channel)
        #expect(heads(post) == ["POST /v1/secret/data/b"])
        let body = post.compactMap { if case .body(let bytes) = $0 { String(buffer: bytes) } else { nil } }.joined()
        #expect(body == "LIST /v1/secret/metadata/ HTTP/1.1")
        // Split over two reads.
        try channel.writeInbound(ByteBuffer(string: "LI"))
        try channel.writeInbound(ByteBuffer(string: "ST /v1/sys/policies/acl HTTP/1.1\r\nHost: x\r\n\r\n"))
        #expect(heads(try parts(channel)) == ["GET /v1/sys/policies/acl?list=true"])
        _ = try channel.finish()
    }
}
