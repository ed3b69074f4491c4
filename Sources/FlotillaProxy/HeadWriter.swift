import NIOCore

/// Writes the heads the proxy sends: a client's request head on its way upstream and an
/// upstream's response head on its way back. Every header line that is not hop-by-hop is copied
/// byte for byte; the proxy's own lines are appended.
enum HeadWriter {
    /// How the response tells the client about its connection.
    enum ClientConnection: Equatable {
        /// HTTP/1.1 keep-alive: nothing to say.
        case persistent
        /// An HTTP/1.0 client that asked for keep-alive and gets it.
        case keepAliveHTTP10
        /// The proxy closes the client connection after this response.
        case close
        /// A 101: the connection switches to the protocol named.
        case upgrade(String)
        /// An interim (1xx) response: no connection options.
        case interim
    }

    /// The request head for the upstream: hop-by-hop headers out, `X-Forwarded-For` appended to,
    /// `X-Real-IP`, `X-Forwarded-Proto` and `X-Forwarded-Host` set, the target rewritten if the
    /// route strips or prepends. An HTTP/1.0 request stays HTTP/1.0 (so the upstream frames its
    /// response for it) and asks for keep-alive; an upgrade keeps its `Connection`/`Upgrade` pair.
    ///
    /// `authority`: the host of an absolute-form target, which replaces the `Host` header
    /// (RFC 9112 §3.2.2).
    static func upstreamRequest(
        _ head: HTTP1Head, target: String?, authority: String? = nil, clientAddress: String, secure: Bool = false, upgrade: String?,
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var out = allocator.buffer(capacity: head.bytes.readableBytes + 128 + 3 * clientAddress.utf8.count + (target?.utf8.count ?? 0))
        head.bytes.withUnsafeReadableBytes { bytes in
            func copy(_ start: Int, _ end: Int) { out.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[start..<end])) }
            copy(0, head.methodEnd)
            out.writeInteger(UInt8(ascii: " "))
            if let target { out.writeString(target) } else { copy(head.targetStart, head.targetEnd) }
            out.writeStaticString(head.minorVersion == 0 ? " HTTP/1.0\r\n" : " HTTP/1.1\r\n")
            var forwardedFor = false
            for field in head.fields {
                switch field.kind {
                case .connection, .keepAlive, .proxyConnection, .te, .upgrade, .xForwardedProto, .xForwardedHost, .xRealIP:
                    continue
                case .xForwardedFor:
                    forwardedFor = true
                    continue
                case .host where authority != nil:
                    continue
                case .other where !head.connectionNames.isEmpty && isNamedInConnection(head, field):
                    continue
                default:
                    copy(field.nameStart, field.valueEnd)
                    out.writeStaticString("\r\n")
                }
            }
            out.writeStaticString("X-Forwarded-For: ")
            if forwardedFor {
                // Every earlier hop, in order, then this client.
                for field in head.fields where field.kind == .xForwardedFor && field.valueEnd > field.valueStart {
                    copy(field.valueStart, field.valueEnd)
                    out.writeStaticString(", ")
                }
            }
            out.writeString(clientAddress)
            out.writeStaticString("\r\nX-Real-IP: ")
            out.writeString(clientAddress)
            if secure { out.writeStaticString("\r\nX-Forwarded-Proto: https\r\n") } else { out.writeStaticString("\r\nX-Forwarded-Proto: http\r\n") }
            if let authority {
                out.writeStaticString("Host: ")
                out.writeString(authority)
                out.writeStaticString("\r\nX-Forwarded-Host: ")
                out.writeString(authority)
                out.writeStaticString("\r\n")
            } else if let host = head.host, host.valueEnd > host.valueStart {
                out.writeStaticString("X-Forwarded-Host: ")
                copy(host.valueStart, host.valueEnd)
                out.writeStaticString("\r\n")
            }
            if let upgrade {
                out.writeStaticString("Connection: Upgrade\r\nUpgrade: ")
                out.writeString(upgrade)
                out.writeStaticString("\r\n")
            } else if head.minorVersion == 0 {
                out.writeStaticString("Connection: keep-alive\r\n")
            }
            out.writeStaticString("\r\n")
        }
        return out
    }

    /// The response head for the client: the upstream's status and end-to-end headers, as
    /// HTTP/1.1, with the connection options of the client's own connection.
    static func clientResponse(_ head: HTTP1Head, connection: ClientConnection, extraCapacity: Int = 0, allocator: ByteBufferAllocator) -> ByteBuffer {
        var out = allocator.buffer(capacity: head.bytes.readableBytes + 48 + extraCapacity)
        head.bytes.withUnsafeReadableBytes { bytes in
            func copy(_ start: Int, _ end: Int) { out.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[start..<end])) }
            out.writeStaticString("HTTP/1.1")
            copy(head.statusRest, head.statusLineEnd)
            out.writeStaticString("\r\n")
            for field in head.fields {
                if field.kind.isHopByHop { continue }
                // With a transfer coding the length is the chunking's; a Content-Length beside it
                // must not travel on (RFC 9112 §6.3).
                if field.kind == .contentLength && head.hasTransferEncoding { continue }
                if field.kind == .other && !head.connectionNames.isEmpty && isNamedInConnection(head, field) { continue }
                copy(field.nameStart, field.valueEnd)
                out.writeStaticString("\r\n")
            }
            switch connection {
            case .persistent, .interim: break
            case .keepAliveHTTP10: out.writeStaticString("Connection: keep-alive\r\n")
            case .close: out.writeStaticString("Connection: close\r\n")
            case .upgrade(let proto):
                out.writeStaticString("Connection: Upgrade\r\nUpgrade: ")
                out.writeString(proto)
                out.writeStaticString("\r\n")
            }
            out.writeStaticString("\r\n")
        }
        return out
    }

    /// A response the proxy makes itself (404, 503, 502, 504, 400…): a short text body.
    static func localResponse(
        status: Int, message: String, close: Bool, headRequest: Bool, location: String? = nil, allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var out = allocator.buffer(capacity: 160 + message.utf8.count + (location?.utf8.count ?? 0))
        out.writeStaticString("HTTP/1.1 ")
        out.writeString(String(status))
        out.writeInteger(UInt8(ascii: " "))
        out.writeString(reasonPhrase(status))
        if let location {
            out.writeStaticString("\r\nLocation: ")
            out.writeString(location)
        }
        out.writeStaticString("\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ")
        out.writeString(String(message.utf8.count))
        out.writeStaticString(close ? "\r\nConnection: close\r\n\r\n" : "\r\n\r\n")
        if !headRequest { out.writeString(message) }
        return out
    }

    static func reasonPhrase(_ status: Int) -> String {
        switch status {
        case 301: "Moved Permanently"
        case 302: "Found"
        case 303: "See Other"
        case 307: "Temporary Redirect"
        case 308: "Permanent Redirect"
        case 400: "Bad Request"
        case 403: "Forbidden"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 408: "Request Timeout"
        case 431: "Request Header Fields Too Large"
        case 502: "Bad Gateway"
        case 503: "Service Unavailable"
        case 504: "Gateway Timeout"
        case 505: "HTTP Version Not Supported"
        default: "Error"
        }
    }

    private static func isNamedInConnection(_ head: HTTP1Head, _ field: HeaderField) -> Bool {
        let name = head.name(of: field).lowercased()
        return head.connectionNames.contains(name)
    }
}
