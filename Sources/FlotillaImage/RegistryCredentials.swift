internal import Foundation

/// Registry credentials, read from Docker's `config.json` format so operators can reuse the file
/// `docker login` writes (passed to Flotilla with `--registry-auth-file`).
///
/// Accepted entry shapes under `auths`, keyed by registry (`host[:port]`, optionally with a scheme and
/// path such as `https://index.docker.io/v1/`, which means Docker Hub):
/// - `{"auth": base64("user:pass")}` (what `docker login` writes),
/// - `{"username": "...", "password": "..."}`,
/// - `{"identitytoken": "..."}` (an OAuth2 refresh token, exchanged at the token endpoint).
/// Credential helpers (`credsStore`, `credHelpers`) are not run: Flotilla never executes programs named
/// in a data file. Their presence is reported in ``ignoredHelpers`` so the CLI can warn.
public struct RegistryCredentials: Sendable, Hashable {
    /// One registry's credential.
    public enum Credential: Sendable, Hashable, CustomStringConvertible {
        case basic(username: String, password: String)
        /// An OAuth2 refresh token (`identitytoken`); `username` is sent as the client's user when known.
        case identityToken(String, username: String?)

        /// Never shows the secret.
        public var description: String {
            switch self {
            case .basic(let username, _): return "basic(\(username))"
            case .identityToken(_, let username): return "identityToken(\(username ?? "-"))"
            }
        }
    }

    /// Normalised registry host → credential.
    public private(set) var entries: [String: Credential]
    /// Registries that the file delegates to credential helpers (not supported, see type docs).
    public private(set) var ignoredHelpers: [String]

    /// No credentials: every registry is spoken to anonymously.
    public init() {
        self.entries = [:]
        self.ignoredHelpers = []
    }

    /// Credentials from explicit `registry → credential` pairs (keys are normalised like file keys).
    public init(_ entries: [String: Credential]) {
        self.entries = [:]
        self.ignoredHelpers = []
        for (key, value) in entries { self.entries[Self.normalize(key)] = value }
    }

    /// Parses the bytes of a Docker `config.json`.
    /// - Throws: ``RegistryError/Kind/invalidCredentials`` naming the bad entry (never its secret).
    public init(dockerConfigJSON bytes: [UInt8]) throws {
        self.init()
        let root: Any
        do {
            root = try JSONSerialization.jsonObject(with: Data(bytes))
        } catch {
            throw RegistryError(.invalidCredentials, "registry auth file is not valid JSON")
        }
        guard let object = root as? [String: Any] else {
            throw RegistryError(.invalidCredentials, "registry auth file must be a JSON object with an \"auths\" object")
        }
        if let store = object["credsStore"] as? String, !store.isEmpty { ignoredHelpers.append("credsStore:\(store)") }
        if let helpers = object["credHelpers"] as? [String: Any] { ignoredHelpers += helpers.keys.sorted() }
        guard let authsValue = object["auths"] else { return }
        guard let auths = authsValue as? [String: Any] else {
            throw RegistryError(.invalidCredentials, "registry auth file: \"auths\" must be an object")
        }
        for key in auths.keys.sorted() {
            guard let entry = auths[key] as? [String: Any] else {
                throw RegistryError(.invalidCredentials, "registry auth file: entry \"\(key)\" must be an object")
            }
            guard let credential = try Self.credential(from: entry, key: key) else { continue }
            entries[Self.normalize(key)] = credential
        }
    }

    /// Reads and parses a Docker `config.json` at `path`.
    public init(contentsOfFile path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw RegistryError(.invalidCredentials, "cannot read registry auth file \(path)")
        }
        do {
            try self.init(dockerConfigJSON: Array(data))
        } catch let error as RegistryError {
            throw RegistryError(error.kind, error.message.replacingOccurrences(of: "registry auth file", with: "registry auth file \(path)"))
        }
    }

    /// The credential for a registry host as it appears in an ``ImageReference`` (`registry-1.docker.io`,
    /// `docker.io` and `index.docker.io` are one registry).
    public func credential(forRegistry registry: String) -> Credential? {
        entries[Self.normalize(registry)]
    }

    private static func credential(from entry: [String: Any], key: String) throws -> Credential? {
        let username = (entry["username"] as? String).flatMap { $0.isEmpty ? nil : $0 }
        if let token = entry["identitytoken"] as? String, !token.isEmpty {
            var user = username
            if user == nil, let auth = entry["auth"] as? String, let decoded = decodeAuth(auth) { user = decoded.0.isEmpty ? nil : decoded.0 }
            return .identityToken(token, username: user)
        }
        if let auth = entry["auth"] as? String, !auth.isEmpty {
            guard let (user, password) = decodeAuth(auth) else {
                throw RegistryError(
                    .invalidCredentials,
                    "registry auth file: entry \"\(key)\": \"auth\" must be base64 of \"username:password\""
                )
            }
            return .basic(username: user, password: password)
        }
        if let username, let password = entry["password"] as? String {
            return .basic(username: username, password: password)
        }
        // Docker writes empty entries (`{}`) for registries whose secret lives in a helper.
        return nil
    }

    /// base64("user:pass") → (user, pass), splitting at the first colon (passwords may contain colons).
    private static func decodeAuth(_ auth: String) -> (String, String)? {
        let trimmed = auth.trimmingCharacters(in: .whitespacesAndNewlines)
        var padded = trimmed
        while padded.utf8.count % 4 != 0 { padded += "=" }
        guard let data = Data(base64Encoded: padded), let text = String(data: data, encoding: .utf8),
            let colon = text.firstIndex(of: ":")
        else { return nil }
        return (String(text[..<colon]), String(text[text.index(after: colon)...]))
    }

    /// `https://index.docker.io/v1/` → `docker.io`; `http://Host:5000/path` → `host:5000`.
    static func normalize(_ key: String) -> String {
        var s = Substring(key.trimmingCharacters(in: .whitespaces))
        for scheme in ["https://", "http://"] where s.lowercased().hasPrefix(scheme) {
            s = s.dropFirst(scheme.count)
        }
        if let slash = s.firstIndex(of: "/") { s = s[..<slash] }
        let host = s.lowercased()
        switch host {
        case "docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com": return "docker.io"
        default: return host
        }
    }
}
