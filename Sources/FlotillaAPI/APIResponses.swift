import FlotillaCore
import FlotillaStore
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

/// Building responses in the shapes every Flotilla surface shares.
enum APIResponse {
    static let jsonHeaders: HTTPFields = [.contentType: "application/json; charset=utf-8"]

    static func json(_ value: JSONValue, status: HTTPResponse.Status = .ok, headers extra: HTTPFields = [:]) -> Response {
        json(bytes: value.serialized(), status: status, headers: extra)
    }

    static func json(bytes: [UInt8], status: HTTPResponse.Status = .ok, headers extra: HTTPFields = [:]) -> Response {
        var headers = jsonHeaders
        headers.append(contentsOf: extra)
        return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    /// A `Codable` value as JSON (keys sorted, absent optionals left out).
    static func encoded(_ value: some Encodable, status: HTTPResponse.Status = .ok) throws -> Response {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return json(bytes: Array(try encoder.encode(value)), status: status)
    }

    /// Marathon's error body, `{"message": …, "details": [{"path": …, "errors": […]}]}`, with the status
    /// that fits the error.
    static func marathonError(_ error: any Error) -> Response {
        let flotillaError: FlotillaError
        if let error = error as? FlotillaError {
            flotillaError = error
        } else if let error = error as? any HTTPResponseError, error.status == .contentTooLarge {
            return json(.object(["message": .string("Request body too large: the limit is \(MarathonRoutes.maximumBodyBytes / 1024) KiB")]), status: .contentTooLarge)
        } else if let error = error as? StoreError, case .unavailable = error {
            flotillaError = .unavailable("\(error): try again when it is back")
        } else {
            flotillaError = .unavailable("internal error: \(error)")
        }
        var body: [String: JSONValue] = ["message": .string(flotillaError.message)]
        let status: HTTPResponse.Status
        switch flotillaError {
        case .malformed: status = .badRequest
        case .badRequest: status = .badRequest
        case .invalid(_, let details):
            status = .unprocessableContent
            body["details"] = .array(details.map { .object(["path": .string($0.path), "errors": .array($0.errors.map(JSONValue.string))]) })
        case .notFound: status = .notFound
        case .conflict(_, let deployments):
            status = .conflict
            if !deployments.isEmpty {
                body["deployments"] = .array(deployments.map { .object(["id": .string($0)]) })
                body["message"] = .string(flotillaError.message.replacingOccurrences(of: "<DEPLOYMENT_ID>", with: deployments[0]))
            }
        case .unavailable: status = .serviceUnavailable
        }
        return json(.object(body), status: status)
    }
}

extension Request {
    /// A query flag as Marathon clients send it: `true`, `True`, `1`, or present without a value.
    func flag(_ name: String) throws(FlotillaError) -> Bool {
        guard let value = uri.queryParameters[Substring(name)] else { return false }
        switch value.lowercased() {
        case "", "true", "1", "yes": return true
        case "false", "0", "no": return false
        default: throw .badRequest("query parameter '\(name)' must be true or false, got '\(value)'")
        }
    }

    /// Query parameters decoded the way HTML forms and Go's `url.ParseQuery` do (`+` is a space),
    /// which is how Consul clients encode them.
    func formValues(_ name: String) -> [String] {
        guard let query = uri.query else { return [] }
        var values: [String] = []
        for pair in query.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = String(parts[0]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? String(parts[0])
            guard key == name else { continue }
            let raw = parts.count > 1 ? String(parts[1]) : ""
            values.append(raw.replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? raw)
        }
        return values
    }

    func formValue(_ name: String) -> String? { formValues(name).first }

    func queryValues(_ name: String) -> [String] {
        uri.queryParameters[values: Substring(name)].flatMap { $0.split(separator: ",").map(String.init) }
    }
}

extension HTTPField.Name {
    /// The deployment a change started, as Marathon names it.
    static let marathonDeploymentID = HTTPField.Name("Marathon-Deployment-Id")!
}
