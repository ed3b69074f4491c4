import AsyncHTTPClient
import FlotillaImage
import Foundation
import Logging
import Testing

/// Real registries on 127.0.0.1 sharing one storage directory, with a small test image pushed by skopeo:
/// - `open`: Debian's docker-registry without auth;
/// - `basic`: the same with `auth: htpasswd` (bcrypt, user/pass);
/// - `token`: the same with `auth: token`, its tokens served by a Python ES256 JWT issuer (`x5c` chain);
/// - `fake`: a Python server for what a real registry cannot be made to do (redirect blobs to another
///   origin, stall, drip bytes slowly).
///
/// Started once per suite by ``RegistryFixtureTrait`` and torn down (every PID killed, temp dir removed)
/// when the suite ends.
final class RegistryFixture: Sendable {
    @TaskLocal static var current: RegistryFixture?

    static let user = "user"
    static let password = "pass"

    let dir: RegistryTestDir
    let openPort: Int
    let basicPort: Int
    let tokenPort: Int
    let tokenServerPort: Int
    let fakePort: Int
    let storagePort: Int
    let daemons: [RegistryTestDaemon]
    let openRegistry: RegistryTestDaemon
    let httpClient: HTTPClient
    let layout: String

    /// Digests straight from the OCI layout umoci wrote (skopeo pushes OCI content unchanged).
    let amdManifest: ImageDigest
    let armManifest: ImageDigest
    let multiIndex: ImageDigest
    /// The digest skopeo reports for the v2s2-converted push.
    let v2s2Manifest: ImageDigest
    /// The bytes the fake registry serves and their digest.
    let fakeBlob: [UInt8]

    var insecure: Set<String> {
        Set([openPort, basicPort, tokenPort, fakePort, storagePort].map { "127.0.0.1:\($0)" })
    }

    func client(
        _ credentials: RegistryCredentials = RegistryCredentials(),
        idleTimeout: Duration = .seconds(60)
    ) -> RegistryClient {
        var logger = Logger(label: "flotilla.registry.test")
        logger.logLevel = .warning
        return RegistryClient(httpClient: httpClient, insecureRegistries: insecure, credentials: credentials, logger: logger, idleTimeout: idleTimeout)
    }

    func reference(_ port: Int, _ rest: String) throws -> ImageReference {
        try ImageReference(parsing: "127.0.0.1:\(port)/\(rest)")
    }

    var goodCredentials: RegistryCredentials {
        RegistryCredentials([
            "127.0.0.1:\(basicPort)": .basic(username: Self.user, password: Self.password),
            "127.0.0.1:\(tokenPort)": .basic(username: Self.user, password: Self.password),
            "127.0.0.1:\(fakePort)": .basic(username: Self.user, password: Self.password),
        ])
    }

    /// Bytes of a blob in the local OCI layout.
    func layoutBlob(_ digest: ImageDigest) throws -> [UInt8] {
        Array(try Data(contentsOf: URL(fileURLWithPath: "\(layout)/blobs/sha256/\(digest.hex)")))
    }

    private init(
        dir: RegistryTestDir, ports: [Int], daemons: [RegistryTestDaemon], openRegistry: RegistryTestDaemon, httpClient: HTTPClient, layout: String,
        amd: ImageDigest, arm: ImageDigest, multi: ImageDigest, v2s2: ImageDigest, fakeBlob: [UInt8]
    ) {
        self.dir = dir
        (openPort, basicPort, tokenPort, tokenServerPort, fakePort, storagePort) = (ports[0], ports[1], ports[2], ports[3], ports[4], ports[5])
        self.daemons = daemons
        self.openRegistry = openRegistry
        self.httpClient = httpClient
        self.layout = layout
        self.amdManifest = amd
        self.armManifest = arm
        self.multiIndex = multi
        self.v2s2Manifest = v2s2
        self.fakeBlob = fakeBlob
    }

    static func start() async throws -> RegistryFixture {
        let dir = try RegistryTestDir("flotilla-registry-test")
        var daemons: [RegistryTestDaemon] = []
        do {
            var ports: [Int] = []
            while ports.count < 6 {
                let p = try freeLoopbackPort()
                if !ports.contains(p) { ports.append(p) }
            }
            let (openPort, basicPort, tokenPort, tokenServerPort, fakePort, storagePort) = (ports[0], ports[1], ports[2], ports[3], ports[4], ports[5])
            let storage = dir.file("storage")
            try FileManager.default.createDirectory(atPath: storage, withIntermediateDirectories: true)

            // Python helpers first: the token registry reads the issuer's certificate at startup.
            try tokenServerSource.write(toFile: dir.file("tokenserver.py"), atomically: true, encoding: .utf8)
            try fakeRegistrySource.write(toFile: dir.file("fakeregistry.py"), atomically: true, encoding: .utf8)
            let tokenServer = try RegistryTestDaemon(name: "token server", arguments: [RegistryTestDaemon.python, dir.file("tokenserver.py"), dir.path, "\(tokenServerPort)"], logPath: dir.file("tokenserver.log"))
            daemons.append(tokenServer)
            let fake = try RegistryTestDaemon(name: "fake registry", arguments: [RegistryTestDaemon.python, dir.file("fakeregistry.py"), dir.path, "\(fakePort)", "\(storagePort)"], logPath: dir.file("fakeregistry.log"))
            daemons.append(fake)

            let htpasswd = try runTool(["htpasswd", "-Bbn", user, password])
            try htpasswd.write(toFile: dir.file("htpasswd"), atomically: true, encoding: .utf8)

            func config(_ port: Int, auth: String) -> String {
                """
                version: 0.1
                log:
                  level: info
                  accesslog:
                    disabled: false
                storage:
                  filesystem:
                    rootdirectory: \(storage)
                  delete:
                    enabled: true
                http:
                  addr: 127.0.0.1:\(port)
                  secret: flotilla-test-secret
                \(auth)
                """
            }
            try config(openPort, auth: "").write(toFile: dir.file("open.yml"), atomically: true, encoding: .utf8)
            try config(basicPort, auth: """
                auth:
                  htpasswd:
                    realm: flotilla-test
                    path: \(dir.file("htpasswd"))
                """).write(toFile: dir.file("basic.yml"), atomically: true, encoding: .utf8)

            try await tokenServer.waitListening(tokenServerPort)
            try config(tokenPort, auth: """
                auth:
                  token:
                    realm: http://127.0.0.1:\(tokenServerPort)/token
                    service: flotilla-test
                    issuer: flotilla-test-issuer
                    rootcertbundle: \(dir.file("cert.pem"))
                """).write(toFile: dir.file("token.yml"), atomically: true, encoding: .utf8)

            let open = try RegistryTestDaemon(name: "registry(open)", arguments: ["docker-registry", "serve", dir.file("open.yml")], logPath: dir.file("open.log"))
            daemons.append(open)
            let basic = try RegistryTestDaemon(name: "registry(basic)", arguments: ["docker-registry", "serve", dir.file("basic.yml")], logPath: dir.file("basic.log"))
            daemons.append(basic)
            let token = try RegistryTestDaemon(name: "registry(token)", arguments: ["docker-registry", "serve", dir.file("token.yml")], logPath: dir.file("token.log"))
            daemons.append(token)
            try await open.waitListening(openPort)
            try await basic.waitListening(basicPort)
            try await token.waitListening(tokenPort)
            try await fake.waitListening(fakePort)
            try await fake.waitListening(storagePort)

            // The image: one layer with a few files (one of them incompressible, so the layer is big enough
            // to resume halfway), tagged twice with different architectures, plus two nested indexes.
            let layout = dir.file("layout")
            let bundle = dir.file("bundle")
            try runTool(["umoci", "init", "--layout", layout])
            try runTool(["umoci", "new", "--image", "\(layout):base"])
            try runTool(["umoci", "unpack", "--rootless", "--image", "\(layout):base", bundle])
            let rootfs = bundle + "/rootfs"
            try FileManager.default.createDirectory(atPath: rootfs + "/etc/app", withIntermediateDirectories: true)
            try "hello from flotilla\n".write(toFile: rootfs + "/hello.txt", atomically: true, encoding: .utf8)
            try "port = 8080\n".write(toFile: rootfs + "/etc/app/app.conf", atomically: true, encoding: .utf8)
            var generator = SystemRandomNumberGenerator()
            let noise = (0..<(256 * 1024)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            try Data(noise).write(to: URL(fileURLWithPath: rootfs + "/data.bin"))
            try runTool(["umoci", "repack", "--image", "\(layout):base", bundle])
            try runTool([
                "umoci", "config", "--image", "\(layout):base", "--tag", "amd", "--architecture", "amd64", "--os", "linux",
                "--config.entrypoint", "/bin/app", "--config.cmd", "serve", "--config.env", "A=B", "--config.workingdir", "/srv",
                "--config.user", "1000:1000", "--config.exposedports", "8080/tcp", "--config.label", "org.example=flotilla",
                "--config.stopsignal", "SIGINT",
            ])
            try runTool(["umoci", "config", "--image", "\(layout):base", "--tag", "arm", "--architecture", "arm64", "--os", "linux"])
            let (amd, arm) = try layoutDigests(layout)
            let multi = try addIndex(layout, name: "multi", entries: [(arm, "arm64", "v8"), (amd, "amd64", nil)])
            _ = try addIndex(layout, name: "armonly", entries: [(arm, "arm64", "v8")])

            let dest = "docker://127.0.0.1:\(openPort)/test/img"
            let skopeo = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]
            try runTool(skopeo + ["oci:\(layout):amd", "\(dest):oci"])
            try runTool(skopeo + ["--all", "oci:\(layout):multi", "\(dest):multi"])
            try runTool(skopeo + ["--all", "oci:\(layout):armonly", "\(dest):armonly"])
            // The Docker schema 2 form goes through the htpasswd registry, with credentials.
            try runTool(skopeo + ["--format", "v2s2", "--dest-creds", "\(user):\(password)", "oci:\(layout):amd", "docker://127.0.0.1:\(basicPort)/test/img:v2s2"])
            let inspected = try runTool(["skopeo", "inspect", "--tls-verify=false", "docker://127.0.0.1:\(openPort)/test/img:v2s2"])
            guard let object = try JSONSerialization.jsonObject(with: Data(inspected.utf8)) as? [String: Any],
                let digestString = object["Digest"] as? String
            else { throw RegistryHarnessError("skopeo inspect gave no Digest: \(inspected)") }
            let v2s2 = try ImageDigest(parsing: digestString)

            let fakeBlob = (0..<64).flatMap { _ in Array(0...255) as [UInt8] }
            let httpClient = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: RegistryClient.httpClientConfiguration())
            return RegistryFixture(
                dir: dir, ports: ports, daemons: daemons, openRegistry: open, httpClient: httpClient, layout: layout,
                amd: amd, arm: arm, multi: multi, v2s2: v2s2, fakeBlob: fakeBlob
            )
        } catch {
            for daemon in daemons { daemon.stop() }
            dir.remove()
            throw error
        }
    }

    /// Kills every daemon by PID and removes the temp dir (kept when FLOTILLA_TEST_KEEP is set, for debugging).
    func stop() async {
        try? await httpClient.shutdown()
        for daemon in daemons { daemon.stop() }
        if ProcessInfo.processInfo.environment["FLOTILLA_TEST_KEEP"] == nil { dir.remove() }
    }

    private static func layoutDigests(_ layout: String) throws -> (amd: ImageDigest, arm: ImageDigest) {
        let index = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: layout + "/index.json"))) as! [String: Any]
        var found: [String: ImageDigest] = [:]
        for entry in index["manifests"] as! [[String: Any]] {
            let name = (entry["annotations"] as? [String: String])?["org.opencontainers.image.ref.name"] ?? ""
            found[name] = try ImageDigest(parsing: entry["digest"] as! String)
        }
        guard let amd = found["amd"], let arm = found["arm"] else { throw RegistryHarnessError("layout lacks amd/arm: \(found)") }
        return (amd, arm)
    }

    /// Writes an OCI index blob into the layout and tags it, as `skopeo copy --all` then pushes it whole.
    private static func addIndex(_ layout: String, name: String, entries: [(ImageDigest, String, String?)]) throws -> ImageDigest {
        let indexURL = URL(fileURLWithPath: layout + "/index.json")
        var top = try JSONSerialization.jsonObject(with: Data(contentsOf: indexURL)) as! [String: Any]
        var manifests: [[String: Any]] = []
        for (digest, arch, variant) in entries {
            let size = try FileManager.default.attributesOfItem(atPath: "\(layout)/blobs/sha256/\(digest.hex)")[.size] as! Int
            var platform: [String: Any] = ["architecture": arch, "os": "linux"]
            if let variant { platform["variant"] = variant }
            manifests.append(["mediaType": ImageMediaType.ociManifest, "digest": digest.description, "size": size, "platform": platform])
        }
        let sub: [String: Any] = ["schemaVersion": 2, "mediaType": ImageMediaType.ociIndex, "manifests": manifests]
        let bytes = Array(try JSONSerialization.data(withJSONObject: sub, options: [.sortedKeys]))
        let digest = ImageDigest.sha256(of: bytes)
        try Data(bytes).write(to: URL(fileURLWithPath: "\(layout)/blobs/sha256/\(digest.hex)"))
        var list = top["manifests"] as! [[String: Any]]
        list.append([
            "mediaType": ImageMediaType.ociIndex, "digest": digest.description, "size": bytes.count,
            "annotations": ["org.opencontainers.image.ref.name": name],
        ])
        top["manifests"] = list
        try JSONSerialization.data(withJSONObject: top).write(to: indexURL)
        return digest
    }
}

/// Starts the fixture around a whole suite and shares it through ``RegistryFixture/current``.
struct RegistryFixtureTrait: SuiteTrait, TestScoping {
    func provideScope(for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void) async throws {
        let fixture = try await RegistryFixture.start()
        do {
            try await RegistryFixture.$current.withValue(fixture) { try await function() }
        } catch {
            await fixture.stop()
            throw error
        }
        await fixture.stop()
    }
}

extension Trait where Self == RegistryFixtureTrait {
    static var registryFixture: Self { Self() }
}

/// ES256 JWT issuer for docker-registry's `auth: token`, signing with a fresh key whose self-signed
/// certificate is the registry's rootcertbundle; the certificate rides in the JWT's `x5c` header.
/// Anonymous requests get a token (like Docker Hub); requests with wrong Basic credentials get 401.
let tokenServerSource = #"""
import base64, datetime, http.server, json, os, sys, time, urllib.parse, uuid
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

d, port = sys.argv[1], int(sys.argv[2])
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flotilla-test-token-issuer")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
with open(os.path.join(d, "cert.pem"), "wb") as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
good = "Basic " + base64.b64encode(b"user:pass").decode()

def b64u(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

def token(service, scopes):
    access = []
    for s in scopes:
        for one in s.split(" "):
            parts = one.split(":")
            if len(parts) >= 3:
                access.append({"type": parts[0], "name": ":".join(parts[1:-1]), "actions": parts[-1].split(",")})
    t = int(time.time())
    header = {"typ": "JWT", "alg": "ES256", "x5c": [x5c]}
    claims = {"iss": "flotilla-test-issuer", "sub": "user", "aud": service, "exp": t + 300,
              "nbf": t - 10, "iat": t, "jti": str(uuid.uuid4()), "access": access}
    signing_input = b64u(json.dumps(header).encode()) + "." + b64u(json.dumps(claims).encode())
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + b64u(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def answer(self, q):
        auth = self.headers.get("Authorization", "")
        with open(os.path.join(d, "tokenrequests.log"), "a") as f:
            f.write(json.dumps({"method": self.command, "path": urllib.parse.urlparse(self.path).path, "query": q, "auth": auth}) + "\n")
        if auth and auth != good:
            self.send_response(401); self.send_header("Content-Length", "0"); self.end_headers(); return
        if self.command == "POST" and q.get("refresh_token", [""])[0] != "good-refresh-token":
            self.send_response(401); self.send_header("Content-Length", "0"); self.end_headers(); return
        key_name = "access_token" if self.command == "POST" else "token"
        body = json.dumps({key_name: token(q.get("service", [""])[0], q.get("scope", [])), "expires_in": 300}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.answer(urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query))
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        self.answer(urllib.parse.parse_qs(self.rfile.read(n).decode()))

http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""#

/// A registry impostor for behaviour a real one cannot be made to show: blobs redirected to a second
/// origin (which must not see the registry's Authorization), a stall after a few bytes, a slow drip.
let fakeRegistrySource = #"""
import base64, http.server, json, os, sys, threading, time

d, port, storage_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
BLOB = bytes(range(256)) * 64
good = "Basic " + base64.b64encode(b"user:pass").decode()

def log(entry):
    with open(os.path.join(d, "fake.log"), "a") as f:
        f.write(json.dumps(entry) + "\n")

class Main(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def head(self, status, headers):
        self.send_response(status)
        for k, v in headers.items(): self.send_header(k, v)
        self.end_headers()
    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        log({"server": "main", "path": self.path, "auth": auth})
        if self.path.startswith("/v2/redirect/blobs/"):
            if auth != good:
                self.head(401, {"WWW-Authenticate": 'Basic realm="fake"', "Content-Length": "0"}); return
            self.head(307, {"Location": "http://127.0.0.1:%d/storage/blob?sig=abc" % storage_port, "Content-Length": "0"}); return
        if self.path.startswith("/v2/stall/blobs/"):
            self.head(200, {"Content-Length": str(len(BLOB))})
            self.wfile.write(BLOB[:10]); self.wfile.flush()
            time.sleep(30); return
        if self.path.startswith("/v2/slow/blobs/"):
            self.head(200, {"Content-Length": str(len(BLOB))})
            step = len(BLOB) // 8
            for i in range(8):
                time.sleep(0.4)
                self.wfile.write(BLOB[i * step:(i + 1) * step]); self.wfile.flush()
            return
        if self.path.startswith("/v2/huge/manifests/"):
            self.head(200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json", "Transfer-Encoding": "chunked"})
            chunk = b" " * 65536
            try:
                for _ in range(80):
                    self.wfile.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
            return
        if self.path.startswith("/v2/schema1/manifests/"):
            body = json.dumps({"schemaVersion": 1, "name": "schema1", "tag": "x", "architecture": "amd64", "fsLayers": [], "history": []}).encode()
            self.head(200, {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws", "Content-Length": str(len(body))})
            self.wfile.write(body); return
        if self.path.startswith("/v2/baddigest/manifests/"):
            body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "0" * 64, "size": 2},
                               "layers": []}).encode()
            self.head(200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json", "Content-Length": str(len(body)),
                            "Docker-Content-Digest": "sha256:" + "1" * 64})
            self.wfile.write(body); return
        if self.path.startswith("/v2/stallhead/"):
            time.sleep(30); return
        self.head(404, {"Content-Type": "application/json", "Content-Length": "2"}); self.wfile.write(b"{}")

class Storage(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        log({"server": "storage", "path": self.path, "auth": auth})
        if auth:
            self.send_response(400); self.send_header("Content-Length", "0"); self.end_headers(); return
        self.send_response(200); self.send_header("Content-Length", str(len(BLOB))); self.end_headers()
        self.wfile.write(BLOB)

for handler, p in ((Storage, storage_port), (Main, port)):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", p), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
while True:
    time.sleep(3600)
"""#
