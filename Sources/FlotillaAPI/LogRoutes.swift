public import FlotillaControl
import FlotillaCore
import Foundation
public import Hummingbird
import NIOCore

/// `GET /flotilla/v1/logs/{instanceId}?stream=stdout|stderr&lines=N&follow=true`: an instance's
/// output from its sandbox, optionally followed as it grows (and across rotation); the logs of an
/// instance that ended stay readable for as long as `--log-retention` keeps them. An app's
/// instances merged: `LogRoutes+App.swift`.
///
/// In a cluster, an instance that runs on another node has its logs there: the request is relayed
/// to that node's agent and its answer streamed back, so `flotilla logs` works from any agent.
public struct LogRoutes: Sendable {
    let control: ControlPlane
    let sandboxRoot: String
    let localNode: String
    let relay: NodeRelay?

    public init(control: ControlPlane, sandboxRoot: String, localNode: String = "", relay: NodeRelay? = nil) {
        self.control = control
        self.sandboxRoot = sandboxRoot
        self.localNode = localNode
        self.relay = relay
    }

    public func add<Context: RequestContext>(to router: Router<Context>) {
        router.get("/flotilla/v1/logs") { request, _ in
            do {
                return try await self.appLogs(request)
            } catch {
                return APIResponse.marathonError(error)
            }
        }
        router.get("/flotilla/v1/logs/:instance") { request, context in
            do {
                return try await self.logs(request, instanceID: context.parameters.get("instance") ?? "")
            } catch {
                return APIResponse.marathonError(error)
            }
        }
    }

    private func logs(_ request: Request, instanceID: String) async throws -> Response {
        guard !instanceID.isEmpty, !instanceID.contains("/"), !instanceID.hasPrefix(".") else {
            throw FlotillaError.badRequest("'\(instanceID)' is not an instance id")
        }
        let stream = String(request.uri.queryParameters["stream"] ?? "stdout")
        guard stream == "stdout" || stream == "stderr" else { throw FlotillaError.badRequest("stream must be stdout or stderr") }
        let lines = Int(request.uri.queryParameters["lines"] ?? "100") ?? 100
        let follow = try request.flag("follow")
        if let relay, !NodeRelay.isRelayed(request), let remote = try await remoteNode(of: instanceID) {
            return await relay.get(request, to: remote.api, by: localNode, what: "instance \(instanceID)'s log (on node \(remote.name))")
        }
        let path = sandboxRoot + "/" + instanceID + "/" + stream
        if !FileManager.default.fileExists(atPath: path) {
            // An instance this node is still starting has no sandbox yet: its log is empty so far
            // (and followed from the moment it appears); one unknown here has no log at all.
            guard await control.snapshot().instances[instanceID] != nil else {
                throw FlotillaError.notFound("no \(stream) log for instance '\(instanceID)' on this node")
            }
        }
        let initial = Self.tail(path: path, lines: lines)
        if !follow {
            return Response(status: .ok, headers: [.contentType: "text/plain; charset=utf-8"], body: ResponseBody(byteBuffer: ByteBuffer(bytes: initial.bytes)))
        }
        let (body, continuation) = AsyncStream.makeStream(of: ByteBuffer.self)
        let control = self.control
        let task = Task {
            continuation.yield(ByteBuffer(bytes: initial.bytes))
            var offset = initial.endOffset
            var idleChecks = 0
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(250))
                guard let handle = FileHandle(forReadingAtPath: path) else {
                    // Not created yet (still starting) or removed with its sandbox.
                    idleChecks += 1
                    if idleChecks % 8 == 0, await control.snapshot().instances[instanceID] == nil { break }
                    continue
                }
                let size = (try? handle.seekToEnd()) ?? 0
                if size < offset { offset = 0 }  // rotated: the file was truncated
                if size > offset {
                    try? handle.seek(toOffset: offset)
                    if let data = try? handle.read(upToCount: Int(size - offset)) {
                        continuation.yield(ByteBuffer(bytes: data))
                        offset += UInt64(data.count)
                    }
                }
                try? handle.close()
                // Stop following once the instance is gone.
                idleChecks += 1
                if idleChecks % 8 == 0, await control.snapshot().instances[instanceID] == nil { break }
            }
            continuation.finish()
        }
        continuation.onTermination = { _ in task.cancel() }
        return Response(status: .ok, headers: [.contentType: "text/plain; charset=utf-8"], body: ResponseBody(asyncSequence: body))
    }

    /// The node (other than this one) that runs the instance, with its API address; nil when the
    /// instance is here or unknown (then this node's sandbox answers, or says there is no log).
    private func remoteNode(of instanceID: String) async throws -> (name: String, api: String)? {
        let snapshot = await control.snapshot()
        guard let node = snapshot.instances[instanceID]?.spec.node, node != localNode else { return nil }
        if let info = snapshot.nodes[node] {
            guard let api = info.api else {
                throw FlotillaError.notFound("instance '\(instanceID)' runs on node \(node), whose agent does not advertise its API: ask that agent")
            }
            return (node, api)
        }
        throw FlotillaError.unavailable("instance '\(instanceID)' runs on node \(node), which is down: its logs are on that machine")
    }

    static func tail(path: String, lines: Int) -> (bytes: [UInt8], endOffset: UInt64) {
        guard let handle = FileHandle(forReadingAtPath: path) else { return ([], 0) }
        defer { try? handle.close() }
        let size = (try? handle.seekToEnd()) ?? 0
        let window: UInt64 = min(size, UInt64(max(lines, 1)) * 512 + 4096)
        try? handle.seek(toOffset: size - window)
        let data = (try? handle.read(upToCount: Int(window))) ?? Data()
        var bytes = Array(data)
        let newlines = bytes.indices.filter { bytes[$0] == UInt8(ascii: "\n") }
        if newlines.count > lines, lines >= 0 {
            let cut = newlines[newlines.count - lines - 1] + 1
            bytes.removeFirst(cut)
        }
        return (bytes, size)
    }
}
