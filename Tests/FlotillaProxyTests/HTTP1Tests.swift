@testable import FlotillaProxy
import Foundation
import NIOCore
import Testing

private func parsedRequest(_ text: String) throws(HTTP1Error) -> HTTP1Head {
    var head = HTTP1Head()
    head.bytes = ByteBuffer(string: text)
    try HTTP1Parser.parseRequest(&head)
    return head
}

private func parsedResponse(_ text: String) throws(HTTP1Error) -> HTTP1Head {
    var head = HTTP1Head()
    head.bytes = ByteBuffer(string: text)
    try HTTP1Parser.parseResponse(&head)
    return head
}

private func rejection(_ text: String) -> Int? {
    do {
        _ = try parsedRequest(text)
        return nil
    } catch {
        return error.status
    }
}

@Suite struct HTTP1ParserTests {
    @Test func findsTheEndOfAHeadWhateverTheSplit() {
        let text = Array("GET / HTTP/1.1\r\nHost: a\r\n\r\nNEXT".utf8)
        for split in 1..<text.count {
            var scanned = 0
            let first = text[..<split].withUnsafeBytes { HTTP1Parser.headLength($0, from: 0) }
            if let first {
                #expect(first == 27, "split at \(split)")
                continue
            }
            scanned = HTTP1Parser.resumePoint(split)
            let whole = text.withUnsafeBytes { HTTP1Parser.headLength($0, from: scanned) }
            #expect(whole == 27, "split at \(split)")
        }
        #expect(Array("GET / HTTP/1.0\n\nrest".utf8).withUnsafeBytes { HTTP1Parser.headLength($0) } == 16)
    }

    @Test func readsWhatTheProxyNeeds() throws {
        let head = try parsedRequest("POST /api/items?x=1 HTTP/1.1\r\nHost: Shop.Example:7680\r\nContent-Length: 12\r\nConnection: close\r\nExpect: 100-continue\r\n\r\n")
        #expect(head.method == "POST")
        #expect(head.target == "/api/items?x=1")
        #expect(head.minorVersion == 1)
        #expect(head.hostValue == "Shop.Example:7680")
        #expect(head.contentLength == 12)
        #expect(!head.keepAlive)
        #expect(head.expectContinue)
        #expect(!head.isHeadRequest)
        let old = try parsedRequest("HEAD / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        #expect(old.isHeadRequest && old.keepAlive && old.minorVersion == 0)
        #expect(!(try parsedRequest("GET / HTTP/1.0\r\n\r\n")).keepAlive)
        let chunked = try parsedRequest("PUT /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\n\r\n")
        #expect(chunked.chunked && chunked.contentLength == nil)
        let upgrade = try parsedRequest("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n")
        #expect(upgrade.connectionUpgrade && upgrade.upgradeValue == "websocket")
    }

    @Test func rejectsWhatCouldBeSmuggledOrIsMalformed() {
        #expect(rejection("GET / HTTP/1.1\r\nHost : a\r\n\r\n") == 400)
        #expect(rejection("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n") == 400)
        #expect(rejection("GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n") == 400)
        #expect(rejection("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n") == 400)
        #expect(rejection("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n") == 400)
        #expect(rejection("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n") == 400)
        #expect(rejection("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n") == 400)
        #expect(rejection("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n") == 400)
        #expect(rejection("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n") == 400)
        #expect(rejection("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n") == 400)
        #expect(rejection("GET / HTTP/1.1\r\n\r\n") == 400)
        #expect(rejection("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n") == 400)
        #expect(rejection("GET / HTTP/2.0\r\nHost: a\r\n\r\n") == 505)
        #expect(rejection("GET / HTTQ/1.1\r\nHost: a\r\n\r\n") == 400)
        #expect(rejection("GET  / HTTP/1.1\r\nHost: a\r\n\r\n") == 400)
        #expect(rejection("G\u{1}T / HTTP/1.1\r\nHost: a\r\n\r\n") == 400)
        #expect(rejection("GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n") == 400)
        #expect(rejection("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n") == 400)
        #expect(rejection("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 7, 7\r\n\r\n") == nil)
    }

    @Test func readsStatusLines() throws {
        let head = try parsedResponse("HTTP/1.0 404 Not Found\r\nContent-Length: 3\r\n\r\n")
        #expect(head.status == 404 && head.minorVersion == 0 && !head.keepAlive)
        #expect((try parsedResponse("HTTP/1.1 204\r\n\r\n")).status == 204)
        #expect(throws: HTTP1Error.self) { try parsedResponse("HTTP/1.1 20 OK\r\n\r\n") }
        #expect(throws: HTTP1Error.self) { try parsedResponse("HTTP/1.1 099 Odd\r\n\r\n") }
        #expect(throws: HTTP1Error.self) { try parsedResponse("HTTP/1.1 200OK\r\n\r\n") }
    }
}

@Suite struct BodyFramerTests {
    /// Feeds `text` in pieces of `piece` bytes; returns the body bytes and whether it completed.
    func frame(_ framing: BodyFramer.Framing, _ text: String, piece: Int) throws -> (body: Int, complete: Bool) {
        var framer = BodyFramer(framing)
        let bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count && !framer.isComplete {
            let end = min(bytes.count, offset + piece)
            let taken = try bytes[offset..<end].withUnsafeBytes { try framer.consume($0) }
            #expect(taken <= end - offset)
            offset += taken
            if offset < end { break }  // the framer stopped short: its body ended
        }
        return (offset, framer.isComplete)
    }

    @Test func chunkedBodiesEndInTheRightPlaceWhateverTheSplit() throws {
        let body = "5;name=value\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nChecksum: 1\r\n\r\n"
        for piece in 1...body.utf8.count {
            let (taken, complete) = try frame(.chunked, body + "GET / HTTP/1.1\r\n", piece: piece)
            #expect(complete, "piece \(piece)")
            #expect(taken == body.utf8.count, "piece \(piece)")
        }
        let (_, unfinished) = try frame(.chunked, "5\r\nhel", piece: 100)
        #expect(!unfinished)
        #expect((try frame(.chunked, "3 \r\nabc\r\n0\r\n\r\n", piece: 4)).complete)
    }

    @Test func malformedChunkingIsAnError() {
        for bad in ["x\r\n", "5\r\nhelloX\r\n", "5 6\r\nhello\r\n", "FFFFFFFFFFFFFFFFFF\r\n", "\r\n", "5\rX", "2;\nxx\r\n", "2\r\nxx\n0\r\n\r\n", "0\r\nX: 1\n\r\n", "0\r\n\n"] {
            #expect(throws: HTTP1Error.self, "\(bad)") { try frame(.chunked, bad, piece: 3) }
        }
        let endless = "1;" + String(repeating: "x", count: BodyFramer.metadataLimit + 10)
        #expect(throws: HTTP1Error.self) { try frame(.chunked, endless, piece: 4096) }
    }

    @Test func lengthsAndClose() throws {
        let (taken, complete) = try frame(.length(5), "helloNEXT", piece: 2)
        #expect(taken == 5 && complete)
        #expect(BodyFramer(.length(0)).isComplete)
        #expect(!(try frame(.untilClose, "anything", piece: 3)).complete)
    }

    @Test func randomInputNeverTraps() {
        var generator = SystemRandomNumberGenerator()
        let alphabet = Array("0123456789abcdefABCDEF;= \t\r\n:xHTTP/1.GETPOSTHost".utf8)
        for _ in 0..<20_000 {
            let count = Int.random(in: 0..<64, using: &generator)
            let bytes = (0..<count).map { _ in Bool.random() ? alphabet.randomElement()! : UInt8.random(in: 0...255) }
            var framer = BodyFramer(.chunked)
            _ = try? bytes.withUnsafeBytes { chunk throws(HTTP1Error) in try framer.consume(chunk) }
            var head = HTTP1Head()
            head.bytes = ByteBuffer(bytes: bytes + Array("\r\n\r\n".utf8))
            _ = try? HTTP1Parser.parseRequest(&head)
            _ = try? HTTP1Parser.parseResponse(&head)
        }
    }
}

@Suite struct HeadWriterTests {
    func lines(_ buffer: ByteBuffer) -> [String] {
        String(buffer: buffer).components(separatedBy: "\r\n")
    }

    @Test func requestHeadLosesHopByHopAndGainsForwardingHeaders() throws {
        let head = try parsedRequest(
            "POST /api/items HTTP/1.1\r\nHost: shop:7680\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
                + "X-Secret: 1\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\nAccept: */*\r\nX-Forwarded-For: 10.0.0.9\r\nX-Real-IP: 6.6.6.6\r\n"
                + "X-Forwarded-Proto: https\r\n\r\n")
        let out = lines(HeadWriter.upstreamRequest(head, target: "/items", clientAddress: "127.0.0.1", upgrade: nil, allocator: .init()))
        #expect(out.first == "POST /items HTTP/1.1")
        #expect(out.contains("Host: shop:7680"))
        #expect(out.contains("Transfer-Encoding: chunked"), "chunked bodies are relayed as they are")
        #expect(out.contains("Accept: */*"))
        for gone in ["Connection", "Keep-Alive", "TE", "X-Secret", "Upgrade"] {
            #expect(!out.contains { $0.lowercased().hasPrefix(gone.lowercased() + ":") }, "\(gone)")
        }
        #expect(out.contains("X-Forwarded-For: 10.0.0.9, 127.0.0.1"))
        #expect(out.contains("X-Real-IP: 127.0.0.1") && !out.contains("X-Real-IP: 6.6.6.6"))
        #expect(out.contains("X-Forwarded-Proto: http"))
        #expect(out.contains("X-Forwarded-Host: shop:7680"))
        #expect(out.suffix(2) == ["", ""])
    }

    @Test func upgradesKeepTheirPairAndHTTP10AsksForKeepAlive() throws {
        let ws = try parsedRequest("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        let out = lines(HeadWriter.upstreamRequest(ws, target: nil, clientAddress: "::1", upgrade: "websocket", allocator: .init()))
        #expect(out.first == "GET /ws HTTP/1.1")
        #expect(out.contains("Connection: Upgrade") && out.contains("Upgrade: websocket"))
        let old = try parsedRequest("GET / HTTP/1.0\r\n\r\n")
        let oldOut = lines(HeadWriter.upstreamRequest(old, target: nil, clientAddress: "::1", upgrade: nil, allocator: .init()))
        #expect(oldOut.first == "GET / HTTP/1.0" && oldOut.contains("Connection: keep-alive"))
    }

    @Test func absoluteFormAuthorityBecomesTheHost() throws {
        let head = try parsedRequest("GET http://public.example/x HTTP/1.1\r\nHost: admin.internal\r\n\r\n")
        let out = lines(HeadWriter.upstreamRequest(head, target: "/x", authority: "public.example", clientAddress: "::1", upgrade: nil, allocator: .init()))
        #expect(out.first == "GET /x HTTP/1.1")
        #expect(out.contains("Host: public.example") && !out.contains("Host: admin.internal"))
        #expect(out.contains("X-Forwarded-Host: public.example"))
    }

    @Test func responseWithTransferCodingLosesItsContentLength() throws {
        let head = try parsedResponse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n")
        let out = lines(HeadWriter.clientResponse(head, connection: .persistent, allocator: .init()))
        #expect(out.contains("Transfer-Encoding: chunked") && !out.contains("Content-Length: 99"))
    }

    @Test func responseHeadSpeaksForTheClientConnection() throws {
        let head = try parsedResponse("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nServer: x\r\n\r\n")
        let kept = lines(HeadWriter.clientResponse(head, connection: .persistent, allocator: .init()))
        #expect(kept == ["HTTP/1.1 200 OK", "Content-Length: 2", "Server: x", "", ""])
        let closing = lines(HeadWriter.clientResponse(head, connection: .close, allocator: .init()))
        #expect(closing.contains("Connection: close"))
        let local = String(buffer: HeadWriter.localResponse(status: 503, message: "none\n", close: false, headRequest: true, allocator: .init()))
        #expect(local.hasPrefix("HTTP/1.1 503 Service Unavailable\r\n") && local.contains("Content-Length: 5\r\n") && local.hasSuffix("\r\n\r\n"))
    }
}
