import ArgumentParser
import AsyncHTTPClient
import FlotillaCore
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL
import Synchronization

/// Options every client command shares.
struct ClientOptions: ParsableArguments {
    @Option(help: "The agent's API (env FLOTILLA_API).")
    var api: String = ProcessInfo.processInfo.environment["FLOTILLA_API"] ?? "http://127.0.0.1:7600"

    @Flag(help: "Print JSON for scripts instead of tables.")
    var json = false

    @Option(help: "The CA that signed an https agent's certificate, when the system does not trust it (env FLOTILLA_CACERT).")
    var caCert: String? = ProcessInfo.processInfo.environment["FLOTILLA_CACERT"]

    @Option(help: "A client certificate for an agent that requires one (--tls-client-ca) (env FLOTILLA_CLIENT_CERT).")
    var clientCert: String? = ProcessInfo.processInfo.environment["FLOTILLA_CLIENT_CERT"]

    @Option(help: "The client certificate's key (env FLOTILLA_CLIENT_KEY).")
    var clientKey: String? = ProcessInfo.processInfo.environment["FLOTILLA_CLIENT_KEY"]

    @Option(help: "The ACL token to send (env FLOTILLA_TOKEN, else VAULT_TOKEN or CONSUL_HTTP_TOKEN).")
    var token: String? = {
        let environment = ProcessInfo.processInfo.environment
        return environment["FLOTILLA_TOKEN"] ?? environment["VAULT_TOKEN"] ?? environment["CONSUL_HTTP_TOKEN"]
    }()

    func client() throws -> APIClient {
        APIClient(
            base: api.hasSuffix("/") ? String(api.dropLast()) : api, http: try APIClient.httpClient(caCert: caCert, clientCert: clientCert, clientKey: clientKey),
            token: token)
    }
}

/// A failure the CLI reports in one line and exits non-zero for.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A thin client of the agent's HTTP API.
struct APIClient {
    let base: String
    var http: HTTPClient
    /// Sent as `Authorization: Bearer …` with every request.
    var token: String?

    func authorize(_ request: inout HTTPClientRequest) {
        if let token, !token.isEmpty { request.headers.replaceOrAdd(name: "Authorization", value: "Bearer " + token) }
    }

    /// The CLI's client: it fails at once when the agent cannot be reached or its certificate is
    /// not trusted (no retrying the connection until the request's deadline), trusts `caCert` and
    /// presents a client certificate when given. Made once per process and kept for its life (the
    /// CLI runs one command).
    static func httpClient(caCert: String?, clientCert: String?, clientKey: String?) throws -> HTTPClient {
        var tls = TLSConfiguration.makeClientConfiguration()
        if let caCert {
            guard let roots = try? NIOSSLCertificate.fromPEMFile(caCert), !roots.isEmpty else { throw CLIError("cannot read the CA certificate \(caCert) (PEM)") }
            tls.trustRoots = .certificates(roots)
        }
        if let clientCert {
            guard let clientKey else { throw CLIError("--client-cert needs --client-key") }
            guard let chain = try? NIOSSLCertificate.fromPEMFile(clientCert), !chain.isEmpty else { throw CLIError("cannot read the client certificate \(clientCert) (PEM)") }
            guard let key = try? NIOSSLPrivateKey(file: clientKey, format: .pem) else { throw CLIError("cannot read the client key \(clientKey) (PEM)") }
            tls.certificateChain = chain.map { .certificate($0) }
            tls.privateKey = .privateKey(key)
        }
        return clients.withLock { made in
            if let made { return made }
            var configuration = HTTPClient.Configuration(tlsConfiguration: tls, timeout: .init(connect: .seconds(5)))
            configuration.connectionPool.retryConnectionEstablishment = false
            let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
            made = client
            return client
        }
    }

    private static let clients = Mutex<HTTPClient?>(nil)

    struct Reply {
        var status: Int
        var body: Data
        var json: JSONValue? { try? JSONValue.parse(body) }
    }

    func request(_ method: HTTPMethod, _ path: String, body: JSONValue? = nil, timeout: TimeAmount = .seconds(30)) async throws -> Reply {
        var request = HTTPClientRequest(url: base + path)
        request.method = method
        request.headers.add(name: "Accept", value: "application/json")
        if let body {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: body.serialized()))
        }
        let response: HTTPClientResponse
        do {
            authorize(&request)
            response = try await http.execute(request, timeout: timeout)
        } catch {
            throw CLIError("cannot reach the agent at \(base): \(error). Is `flotilla agent` running? Set --api or FLOTILLA_API.")
        }
        let bytes = try await response.body.collect(upTo: 64 << 20)
        return Reply(status: Int(response.status.code), body: Data(bytes.readableBytesView))
    }

    /// Sends raw bytes (a KV value) and returns the reply as it is.
    func raw(_ method: HTTPMethod, _ path: String, body: Data) async throws -> Reply {
        var request = HTTPClientRequest(url: base + path)
        request.method = method
        request.body = .bytes(ByteBuffer(bytes: body))
        let response: HTTPClientResponse
        do {
            authorize(&request)
            response = try await http.execute(request, timeout: .seconds(30))
        } catch {
            throw CLIError("cannot reach the agent at \(base): \(error). Is `flotilla agent` running? Set --api or FLOTILLA_API.")
        }
        let bytes = try await response.body.collect(upTo: 64 << 20)
        return Reply(status: Int(response.status.code), body: Data(bytes.readableBytesView))
    }

    /// Sends a request and returns its JSON, turning an error status into a one-line `CLIError`.
    func call(_ method: HTTPMethod, _ path: String, body: JSONValue? = nil) async throws -> JSONValue {
        let reply = try await request(method, path, body: body)
        guard (200..<300).contains(reply.status) else { throw CLIError(Self.describeError(reply)) }
        return reply.json ?? .null
    }

    static func describeError(_ reply: Reply) -> String {
        // Vault's shape: {"errors": ["…"]}, empty for a plain 404.
        if let json = reply.json, case .array(let errors)? = json["errors"] {
            let messages = errors.compactMap(\.stringValue)
            return messages.isEmpty ? (reply.status == 404 ? "not found" : "HTTP \(reply.status)") : messages.joined(separator: "; ")
        }
        guard let json = reply.json, let message = json["message"]?.stringValue else {
            let text = String(decoding: reply.body.prefix(300), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            return "HTTP \(reply.status)" + (text.isEmpty ? "" : ": \(text)")
        }
        var text = message
        if case .array(let details)? = json["details"] {
            let parts = details.compactMap { detail -> String? in
                guard let path = detail["path"]?.stringValue, case .array(let errors)? = detail["errors"] else { return nil }
                return "\(path): " + errors.compactMap(\.stringValue).joined(separator: "; ")
            }
            if !parts.isEmpty { text += " — " + parts.joined(separator: ", ") }
        }
        return text
    }

    /// Streams a response body chunk by chunk (logs -f, pull progress).
    func stream(_ path: String, method: HTTPMethod = .GET, json: JSONValue? = nil, _ body: (ByteBuffer) -> Void) async throws {
        var request = HTTPClientRequest(url: base + path)
        request.method = method
        if let json {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: json.serialized()))
        }
        let response: HTTPClientResponse
        do {
            authorize(&request)
            response = try await http.execute(request, timeout: .hours(24))
        } catch {
            throw CLIError("cannot reach the agent at \(base): \(error)")
        }
        guard response.status == .ok else {
            let bytes = try await response.body.collect(upTo: 1 << 20)
            throw CLIError(Self.describeError(Reply(status: Int(response.status.code), body: Data(bytes.readableBytesView))))
        }
        for try await chunk in response.body { body(chunk) }
    }

    /// Sends a file as the body without reading it into memory (an image archive).
    func upload(_ path: String, file: String, timeout: TimeAmount = .hours(1)) async throws -> Reply {
        guard let handle = FileHandle(forReadingAtPath: file) else { throw CLIError("cannot read \(file)") }
        defer { try? handle.close() }
        let size = (try? FileManager.default.attributesOfItem(atPath: file)[.size] as? Int) ?? nil
        let chunks = AsyncStream<ByteBuffer> { continuation in
            while let data = try? handle.read(upToCount: 1 << 20), !data.isEmpty { continuation.yield(ByteBuffer(bytes: data)) }
            continuation.finish()
        }
        var request = HTTPClientRequest(url: base + path)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/x-tar")
        request.body = .stream(chunks, length: size.map { .known(Int64($0)) } ?? .unknown)
        let response: HTTPClientResponse
        do {
            authorize(&request)
            response = try await http.execute(request, timeout: timeout)
        } catch {
            throw CLIError("cannot reach the agent at \(base): \(error). Is `flotilla agent` running? Set --api or FLOTILLA_API.")
        }
        let bytes = try await response.body.collect(upTo: 64 << 20)
        return Reply(status: Int(response.status.code), body: Data(bytes.readableBytesView))
    }

    /// `/v2/apps/shop/cart` for `/shop/cart` or `shop/cart`.
    static func appPath(_ id: String) -> String {
        "/v2/apps/" + id.split(separator: "/").joined(separator: "/")
    }
}

func printJSON(_ value: JSONValue) {
    print(String(decoding: value.serialized(), as: UTF8.self))
}

/// A plain text table with aligned columns.
func printTable(_ header: [String], _ rows: [[String]]) {
    var widths = header.map(\.count)
    for row in rows {
        for (index, cell) in row.enumerated() where index < widths.count { widths[index] = max(widths[index], cell.count) }
    }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { index, cell in
            index == cells.count - 1 ? cell : cell.padding(toLength: widths[index], withPad: " ", startingAt: 0)
        }.joined(separator: "  ")
    }
    print(line(header))
    for row in rows { print(line(row)) }
}

extension JSONValue {
    var intValue: Int? {
        if case .number(let value) = self { return Int(value) }
        return nil
    }
    var doubleValue: Double? {
        if case .number(let value) = self { return value }
        return nil
    }
    var arrayValue: [JSONValue] {
        if case .array(let values) = self { return values }
        return []
    }
    func text(_ key: String) -> String { self[key]?.stringValue ?? "" }
}
