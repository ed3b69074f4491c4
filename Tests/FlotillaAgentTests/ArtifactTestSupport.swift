import AsyncHTTPClient
import Dispatch
import Foundation
import Logging
import Testing
@testable import FlotillaAgent
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Errors from the test harness itself (not from the code under test).
struct ArtifactHarnessError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// A fresh temporary directory, removed by `remove()`.
struct ArtifactTestDir: Sendable {
    let path: String

    init(_ prefix: String) throws {
        let base = NSTemporaryDirectory().hasSuffix("/") ? String(NSTemporaryDirectory().dropLast()) : NSTemporaryDirectory()
        var template = Array((base + "/\(prefix)-XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw ArtifactHarnessError("mkdtemp failed")
        }
        path = String(cString: made)
    }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// Runs blocking harness work (starting processes, waiting for them) on a Dispatch thread, so that it never
/// starves the cooperative pool the code under test runs on (the machine has 2 cores).
func artifactOffload<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        DispatchQueue.global().async { continuation.resume(with: Result(catching: work)) }
    }
}

/// Runs a program to completion (off the cooperative pool), capturing its output; throws on a non-zero exit.
@discardableResult
func artifactRun(_ arguments: [String], in directory: String? = nil) async throws -> String {
    try await artifactOffload { try artifactRunBlocking(arguments, in: directory) }
}

@discardableResult
func artifactRunBlocking(_ arguments: [String], in directory: String? = nil) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = arguments
    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let stdout = out.fileHandleForReading.readDataToEndOfFile()
    let stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw ArtifactHarnessError("\(arguments.joined(separator: " ")) exited \(process.terminationStatus): \(String(decoding: stderr, as: UTF8.self))")
    }
    return String(decoding: stdout, as: UTF8.self)
}

/// Runs a Python script (given as text) with arguments.
@discardableResult
func artifactPython(_ script: String, _ arguments: [String]) async throws -> String {
    try await artifactRun(["python3", "-c", script] + arguments)
}

// MARK: - Files

func artifactWrite(_ path: String, _ text: String, mode: Int = 0o644) throws {
    try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    try Data(text.utf8).write(to: URL(fileURLWithPath: path))
    chmod(path, mode_t(mode))
}

func artifactWrite(_ path: String, bytes: [UInt8]) throws {
    try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    try Data(bytes).write(to: URL(fileURLWithPath: path))
}

func artifactRead(_ path: String) -> String? {
    (try? Data(contentsOf: URL(fileURLWithPath: path))).map { String(decoding: $0, as: UTF8.self) }
}

func artifactBytes(_ path: String) -> [UInt8]? {
    (try? Data(contentsOf: URL(fileURLWithPath: path))).map { Array($0) }
}

/// Permission bits of `path` (not following a final link).
func artifactMode(_ path: String) -> Int? {
    var info = stat()
    guard lstat(path, &info) == 0 else { return nil }
    return Int(info.st_mode & 0o7777)
}

func artifactIsSymlink(_ path: String) -> Bool {
    var info = stat()
    return lstat(path, &info) == 0 && (info.st_mode & mode_t(S_IFMT)) == mode_t(S_IFLNK)
}

func artifactExists(_ path: String) -> Bool {
    var info = stat()
    return lstat(path, &info) == 0
}

/// Every path under `root` (relative, sorted, hidden files included, links not followed).
func artifactListing(_ root: String) -> [String] {
    var out: [String] = []
    func walk(_ relative: String) {
        let full = relative.isEmpty ? root : root + "/" + relative
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: full) else { return }
        for name in names {
            let child = relative.isEmpty ? name : relative + "/" + name
            out.append(child)
            var info = stat()
            if lstat(root + "/" + child, &info) == 0, (info.st_mode & mode_t(S_IFMT)) == mode_t(S_IFDIR) { walk(child) }
        }
    }
    walk("")
    return out.sorted()
}

// MARK: - HTTP server

/// A Python HTTP server on 127.0.0.1 (ephemeral port) serving `root`, logging every GET path to a file,
/// with extra paths for what plain file serving cannot do:
/// - `/redirect/N/NAME`: 302 → `/redirect/N-1/NAME`, and `/redirect/1/NAME` → `/NAME`;
/// - `/loop/a` ⇄ `/loop/b`: 302 to each other;
/// - `/stall/NAME`: headers (Content-Length 1000000) and 10 bytes, then 30 s of nothing;
/// - `/nolength/NAME`: the file without Content-Length (ends when the connection closes);
/// - `/slow/NAME`: the file after 0.5 s.
/// Stopped by killing its PID.
final class ArtifactTestServer: @unchecked Sendable {
    static let script = #"""
import http.server, os, sys, time
root, log_path = sys.argv[1], sys.argv[2]
log = open(log_path, 'a', buffering=1)

class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=root, **kwargs)

    def log_message(self, format, *args):
        pass

    def redirect(self, location):
        self.send_response(302)
        self.send_header('Location', location)
        self.send_header('Content-Length', '0')
        self.end_headers()

    def do_GET(self):
        log.write('GET %s\n' % self.path)
        log.flush()
        p = self.path
        if p.startswith('/redirect/'):
            _, _, n, name = p.split('/', 3)
            n = int(n)
            return self.redirect('/redirect/%d/%s' % (n - 1, name) if n > 1 else '/' + name)
        if p.startswith('/loop/'):
            return self.redirect('/loop/b' if p == '/loop/a' else '/loop/a')
        if p.startswith('/stall/'):
            self.send_response(200)
            self.send_header('Content-Length', '1000000')
            self.end_headers()
            self.wfile.write(b'x' * 10)
            self.wfile.flush()
            time.sleep(30)
            return
        if p.startswith('/nolength/'):
            with open(os.path.join(root, p[len('/nolength/'):]), 'rb') as f:
                data = f.read()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
            return
        if p.startswith('/slow/'):
            time.sleep(0.5)
            self.path = '/' + p[len('/slow/'):]
        return super().do_GET()

server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
server.daemon_threads = True
print('PORT %d' % server.server_address[1], flush=True)
server.serve_forever()
"""#

    let process = Process()
    let port: Int
    let logPath: String

    init(root: String, logPath: String) throws {
        self.logPath = logPath
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-u", "-c", Self.script, root, logPath]
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        try process.run()
        var line = Data()
        while !line.contains(0x0a) {
            let chunk = out.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            line.append(chunk)
        }
        let text = String(decoding: line, as: UTF8.self)
        guard text.hasPrefix("PORT "), let port = Int(text.dropFirst(5).trimmingCharacters(in: .whitespacesAndNewlines)) else {
            kill(process.processIdentifier, SIGKILL)
            throw ArtifactHarnessError("the test HTTP server did not start: \(text)")
        }
        self.port = port
    }

    func url(_ path: String) -> String { "http://127.0.0.1:\(port)\(path)" }

    /// How many GETs of `path` the server has seen.
    func requests(_ path: String) -> Int {
        (artifactRead(logPath) ?? "").split(separator: "\n").filter { $0 == "GET \(path)" }.count
    }

    func stop() {
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }
}

// MARK: - Harness

/// One test's world: a temp dir with `www/` (served by a fresh ``ArtifactTestServer``), `work/` (holds
/// `sandbox/` and `outside/`, whose contents must not change), `cache/`, and an HTTP client.
final class ArtifactHarness: @unchecked Sendable {
    let dir: ArtifactTestDir
    let www: String
    let work: String
    let sandbox: String
    let outside: String
    let cacheDirectory: String
    let server: ArtifactTestServer
    let client: HTTPClient

    init() throws {
        dir = try ArtifactTestDir("flotilla-fetch")
        www = dir.path + "/www"
        work = dir.path + "/work"
        sandbox = work + "/sandbox"
        outside = work + "/outside"
        cacheDirectory = dir.path + "/cache"
        for path in [www, sandbox, outside] {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        }
        try artifactWrite(outside + "/victim.txt", "untouched\n")
        server = try ArtifactTestServer(root: www, logPath: dir.path + "/server.log")
        client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: ArtifactFetcher.httpClientConfiguration())
    }

    func fetcher(_ configure: (inout ArtifactFetcher.Configuration) -> Void = { _ in }) -> ArtifactFetcher {
        var configuration = ArtifactFetcher.Configuration()
        configure(&configuration)
        var logger = Logger(label: "flotilla.fetch.test")
        logger.logLevel = .warning
        return ArtifactFetcher(httpClient: client, cacheDirectory: cacheDirectory, logger: logger, configuration: configuration)
    }

    func url(_ path: String) -> String { server.url(path) }

    /// Fetches into the sandbox (or `sandbox`), collecting progress lines.
    @discardableResult
    func fetch(_ requests: [ArtifactRequest], into sandbox: String? = nil, with fetcher: ArtifactFetcher? = nil) async throws -> [String] {
        let lines = ArtifactLines()
        try await (fetcher ?? self.fetcher()).fetch(requests, into: sandbox ?? self.sandbox) { lines.append($0) }
        return lines.all
    }

    /// The error a fetch fails with (an `Issue` if it does not fail or fails otherwise).
    func failure(_ requests: [ArtifactRequest], with fetcher: ArtifactFetcher? = nil, sourceLocation: SourceLocation = #_sourceLocation) async -> ArtifactError? {
        do {
            try await fetch(requests, with: fetcher)
            Issue.record("the fetch succeeded", sourceLocation: sourceLocation)
        } catch let error as ArtifactError {
            return error
        } catch {
            Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
        }
        return nil
    }

    /// Everything in `work/` outside the sandbox, with file contents.
    func outsideSnapshot() -> [String] {
        artifactListing(work).filter { $0 != "sandbox" && !$0.hasPrefix("sandbox/") }.map { "\($0)=\(artifactRead(work + "/" + $0) ?? "")" }
            + artifactListing(dir.path).filter { !$0.hasPrefix("work") && !$0.hasPrefix("www") && !$0.hasPrefix("cache") && $0 != "server.log" }
    }

    func close() async {
        let server = self.server
        _ = try? await artifactOffload { server.stop() }
        try? await client.shutdown()
        dir.remove()
    }
}

/// Progress lines gathered from a `@Sendable` callback.
final class ArtifactLines: Sendable {
    private let lines = ArtifactLocked<[String]>([])
    func append(_ line: String) { lines.update { $0.append(line) } }
    var all: [String] { lines.value }
}

final class ArtifactLocked<T: Sendable>: @unchecked Sendable {
    private var storage: T
    private let lock = NSLock()
    init(_ value: T) { storage = value }
    func update(_ body: (inout T) -> Void) { lock.lock(); body(&storage); lock.unlock() }
    var value: T { lock.lock(); defer { lock.unlock() }; return storage }
}

/// Runs `body` with a fresh harness, always torn down.
func withArtifactHarness(_ body: (ArtifactHarness) async throws -> Void) async throws {
    let harness = try await artifactOffload { try ArtifactHarness() }
    do {
        try await body(harness)
    } catch {
        await harness.close()
        throw error
    }
    await harness.close()
}

// MARK: - Archive fixtures

enum ArtifactFixtures {
    /// A tree `top/` with a file, an executable, a link, a hard link and a long path (over 100 bytes).
    static let longName = "top/" + String(repeating: "d", count: 60) + "/" + String(repeating: "e", count: 60) + "/deep.txt"

    static func makeTree(at root: String) throws {
        try artifactWrite(root + "/top/data.txt", "hello data\n")
        try artifactWrite(root + "/top/bin/run.sh", "#!/bin/sh\necho hi\n", mode: 0o755)
        try artifactWrite(root + "/" + longName, "deep\n")
        try FileManager.default.createSymbolicLink(atPath: root + "/top/link", withDestinationPath: "data.txt")
        try FileManager.default.createSymbolicLink(atPath: root + "/top/bin/up", withDestinationPath: "../data.txt")
        try FileManager.default.linkItem(atPath: root + "/top/data.txt", toPath: root + "/top/hard.txt")
    }

    /// Writes `tree` as a zip (deflated entries, `data.txt` stored, links as Unix symlink entries).
    static let zipScript = #"""
import os, sys, zipfile
root, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED) as z:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != '.':
            zi = zipfile.ZipInfo(rel + '/')
            zi.create_system = 3
            zi.external_attr = (0o40755 << 16) | 0x10
            z.writestr(zi, b'')
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            arc = os.path.relpath(path, root)
            if os.path.islink(path):
                zi = zipfile.ZipInfo(arc)
                zi.create_system = 3
                zi.external_attr = 0o120777 << 16
                z.writestr(zi, os.readlink(path))
            elif name == 'data.txt':
                z.write(path, arc, compress_type=zipfile.ZIP_STORED)
            else:
                z.write(path, arc)
"""#

    /// Writes an evil archive: `argv`: output path (`.tgz` or `.zip`), case, an absolute directory outside.
    static let evilScript = #"""
import io, sys, tarfile, zipfile
out, case, outside = sys.argv[1], sys.argv[2], sys.argv[3]
if out.endswith('.zip'):
    z = zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED)
    def file(name, data=b'evil\n'):
        zi = zipfile.ZipInfo(name)
        zi.create_system = 3
        zi.external_attr = 0o644 << 16
        zi.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(zi, data)
    def link(name, target):
        zi = zipfile.ZipInfo(name)
        zi.create_system = 3
        zi.external_attr = 0o120777 << 16
        z.writestr(zi, target)
    file('ok.txt', b'ok\n')
    if case == 'dotdot': file('../evil.txt')
    elif case == 'backslash': file('..\\evil.txt')
    elif case == 'absolute': file(outside + '/evil.txt')
    elif case == 'symlink': link('escape', outside); file('escape/evil.txt')
    elif case == 'relative-symlink': link('escape', '../outside'); file('escape/evil.txt')
    else: raise SystemExit('unknown case ' + case)
    z.close()
else:
    fmt = tarfile.PAX_FORMAT if case.startswith('pax') else tarfile.GNU_FORMAT
    with tarfile.open(out, 'w:gz', format=fmt) as t:
        def file(name, data=b'evil\n'):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
        def link(name, target, kind=tarfile.SYMTYPE):
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.linkname = target
            t.addfile(ti)
        file('ok.txt', b'ok\n')
        if case == 'dotdot': file('../evil.txt')
        elif case == 'nested-dotdot': file('a/b/../../../evil.txt')
        elif case == 'pax-dotdot': file('../' + 'x' * 150 + '/evil.txt')
        elif case == 'absolute': file(outside + '/evil.txt')
        elif case == 'symlink': link('escape', outside); file('escape/evil.txt')
        elif case == 'relative-symlink': link('escape', '../outside'); file('escape/evil.txt')
        elif case == 'dot-trick': link('d', '.'); link('e', 'd/..'); file('e/outside/evil.txt')
        elif case == 'inner-symlink': link('inner', 'sub'); file('sub/x.txt'); file('inner/evil.txt')
        elif case == 'hardlink': link('hard', outside + '/victim.txt', tarfile.LNKTYPE)
        elif case == 'hardlink-dotdot': link('hard', '../outside/victim.txt', tarfile.LNKTYPE)
        else: raise SystemExit('unknown case ' + case)
"""#
}
