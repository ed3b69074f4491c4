import AsyncHTTPClient
import FlotillaControl
import FlotillaCore
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import NIOHTTP1

/// `GET /flotilla/v1/logs?app=/shop/cart`: every instance of an app, merged by time, each line
/// with its time and instance (`LogQuery` for the filters). The instances that ended are in it as
/// long as `--log-retention` keeps their logs.
///
/// In a cluster the agent asked reads its own node's instances and asks every other agent for
/// theirs (relayed with the caller's token, as NDJSON), merging them in; a node that is down or
/// does not answer is named in a `# node …` line (`{"node", "error"}` in NDJSON) and in the
/// `X-Flotilla-Missing-Nodes` header, never left out in silence.
extension LogRoutes {
    static var missingNodesHeader: HTTPField.Name { HTTPField.Name("X-Flotilla-Missing-Nodes")! }

    /// How often a follower looks for new lines, and (every fourth time) for new instances.
    static let followInterval: Duration = .milliseconds(250)

    func appLogs(_ request: Request) async throws -> Response {
        let parameters = FormQuery.parameters(request.uri.query)
        guard let rawApp = parameters["app"], !rawApp.isEmpty else {
            throw FlotillaError.badRequest("give ?app=<app id> for an app's logs, or ask /flotilla/v1/logs/<instance id> for one instance's")
        }
        let app: AppID
        do { app = try AppID(rawApp) } catch { throw FlotillaError.badRequest("'\(rawApp)' is not an app id: \(error.message)") }
        let query = try LogQuery(parameters: parameters)
        let relayed = NodeRelay.isRelayed(request)
        let snapshot = await control.snapshot()
        var sources = localSources(of: app, in: snapshot, streams: query.streams, known: [])
        if snapshot.apps[app] == nil, sources.isEmpty, !relayed {
            throw FlotillaError.notFound("app '\(app)' does not exist, and this node keeps no logs of it")
        }
        var peers: [(name: String, api: String)] = []
        var missing: [(node: String, reason: String)] = []
        if relay != nil, !relayed {
            for (name, info) in snapshot.nodes.sorted(by: { $0.key < $1.key }) where name != localNode {
                if let api = info.api { peers.append((name, api)) } else { missing.append((name, "its agent does not advertise its API")) }
            }
            let appNodes = Set(snapshot.instances.values.filter { $0.spec.appID == app }.map(\.spec.node))
            for name in appNodes.sorted() where name != localNode && snapshot.nodes[name] == nil {
                missing.append((name, "the node is down: the logs of its instances are on that machine"))
            }
        }
        let peerURI = Self.peerURI(app: app, parameters: parameters, query: query)
        var headers: HTTPFields = [.contentType: query.json ? "application/x-ndjson" : "text/plain; charset=utf-8"]

        if !query.follow {
            var parts = sources.indices.map { sources[$0].initial(query) }
            let relay = self.relay
            let answers = await withTaskGroup(of: (String, Result<[LogLine], LogPeerError>).self) { group in
                for peer in peers {
                    group.addTask {
                        guard let relay else { return (peer.name, .failure(LogPeerError(message: "no relay"))) }
                        return (peer.name, await Self.fetch(peerURI, from: peer.api, node: peer.name, relay: relay, request: request))
                    }
                }
                var answers: [(String, Result<[LogLine], LogPeerError>)] = []
                for await answer in group { answers.append(answer) }
                return answers.sorted { $0.0 < $1.0 }
            }
            for (node, answer) in answers {
                switch answer {
                case .success(let lines): parts.append(lines)
                case .failure(let failure): missing.append((node, failure.message))
                }
            }
            if !missing.isEmpty { headers[Self.missingNodesHeader] = missing.map(\.node).joined(separator: ",") }
            var output: [UInt8] = []
            for (node, reason) in missing { Self.writeNotice(node: node, reason: reason, json: query.json, into: &output) }
            Self.write(LogLine.merge(parts).suffix(query.lines), query: query, into: &output)
            return Response(status: .ok, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(bytes: output)))
        }

        if !missing.isEmpty { headers[Self.missingNodesHeader] = missing.map(\.node).joined(separator: ",") }
        let (body, continuation) = AsyncStream.makeStream(of: ByteBuffer.self)
        let relay = self.relay
        let found = sources
        let task = Task {
            var sources = found
            var output: [UInt8] = []
            for (node, reason) in missing { Self.writeNotice(node: node, reason: reason, json: query.json, into: &output) }
            Self.write(LogLine.merge(sources.indices.map { sources[$0].initial(query) }).suffix(query.lines), query: query, into: &output)
            continuation.yield(ByteBuffer(bytes: output))
            await withTaskGroup(of: Void.self) { group in
                if let relay {
                    for peer in peers {
                        group.addTask { await Self.follow(peerURI, from: peer.api, node: peer.name, relay: relay, request: request, query: query, into: continuation) }
                    }
                }
                await self.followLocal(&sources, of: app, query: query, into: continuation)
                group.cancelAll()
            }
            continuation.finish()
        }
        continuation.onTermination = { _ in task.cancel() }
        return Response(status: .ok, headers: headers, body: ResponseBody(asyncSequence: body))
    }

    /// Polls this node's streams of the app, and every fourth time looks for new instances (a
    /// deployment's), read from their first line; ends when the app is deleted, once what its
    /// instances wrote last is out.
    func followLocal(_ sources: inout [LogSource], of app: AppID, query: LogQuery, into continuation: AsyncStream<ByteBuffer>.Continuation) async {
        var round = 0
        var appGone = false
        while !Task.isCancelled {
            try? await Task.sleep(for: Self.followInterval)
            round += 1
            if round % 4 == 0 {
                let snapshot = await control.snapshot()
                sources += localSources(of: app, in: snapshot, streams: query.streams, known: Set(sources.map(\.path)))
                appGone = snapshot.apps[app] == nil
            }
            var output: [UInt8] = []
            Self.write(LogLine.merge(sources.indices.map { sources[$0].poll(query) }), query: query, into: &output)
            if !output.isEmpty { continuation.yield(ByteBuffer(bytes: output)) }
            if appGone { return }
        }
    }

    /// This node's streams of the app's instances: those the store places here, and the sandboxes
    /// left by instances that ended (kept by retention). Leaves out files already in `known`.
    func localSources(of app: AppID, in snapshot: ControlSnapshot, streams: [LogStream], known: Set<String>) -> [LogSource] {
        var ids = Set(snapshot.instances.values.filter { $0.spec.appID == app && ($0.spec.node == localNode || localNode.isEmpty) }.map(\.spec.id))
        let flatName = app.flatName
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: sandboxRoot)) ?? []
        where entry.hasPrefix(flatName + ".") && InstanceSpec.appFlatName(ofInstanceID: entry) == Substring(flatName) {
            ids.insert(entry)
        }
        return ids.sorted().flatMap { id in
            streams.map { LogSource(instance: id, app: app.path, node: localNode, stream: $0, sandbox: sandboxRoot + "/" + id) }
        }.filter { !known.contains($0.path) }
    }

    /// The request another agent gets: the same filters with absolute times, answered as NDJSON.
    static func peerURI(app: AppID, parameters: [String: String], query: LogQuery) -> String {
        var forwarded = parameters
        forwarded["format"] = "json"
        forwarded["app"] = app.path
        if let since = query.sinceMillis { forwarded["since"] = Timestamp.format(Date(timeIntervalSince1970: Double(since) / 1000)) }
        if let until = query.untilMillis { forwarded["until"] = Timestamp.format(Date(timeIntervalSince1970: Double(until) / 1000)) }
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~")
        let items = forwarded.sorted { $0.key < $1.key }.map { name, value in
            "\(name)=\(value.addingPercentEncoding(withAllowedCharacters: allowed) ?? value)"
        }
        return "/flotilla/v1/logs?" + items.joined(separator: "&")
    }

    static func fetch(_ uri: String, from api: String, node: String, relay: NodeRelay, request: Request) async -> Result<[LogLine], LogPeerError> {
        do {
            let answer = try await relay.open(request, uri: uri, to: api, by: node, deadline: .now() + .seconds(10))
            let body = try await answer.body.collect(upTo: 256 << 20)
            guard answer.status == .ok else {
                let text = String(buffer: body)
                let message = (try? JSONValue.parse(Data(text.utf8)))?["message"]?.stringValue ?? text
                return .failure(LogPeerError(message: "its agent answered \(answer.status.code): \(message)"))
            }
            return .success(body.readableBytesView.split(separator: UInt8(ascii: "\n")).compactMap { LogLine(json: $0) })
        } catch {
            return .failure(LogPeerError(message: "its agent at \(api) did not answer (\(error))"))
        }
    }

    /// Passes another agent's followed lines on as they come, in the caller's format.
    static func follow(
        _ uri: String, from api: String, node: String, relay: NodeRelay, request: Request, query: LogQuery,
        into continuation: AsyncStream<ByteBuffer>.Continuation
    ) async {
        var output: [UInt8] = []
        do {
            let answer = try await relay.open(request, uri: uri, to: api, by: node, deadline: .distantFuture)
            guard answer.status == .ok else {
                writeNotice(node: node, reason: "its agent answered \(answer.status.code)", json: query.json, into: &output)
                continuation.yield(ByteBuffer(bytes: output))
                return
            }
            var pending: [UInt8] = []
            for try await chunk in answer.body {
                pending += chunk.readableBytesView
                guard let lastNewline = pending.lastIndex(of: UInt8(ascii: "\n")) else { continue }
                let lines = pending[...lastNewline].split(separator: UInt8(ascii: "\n")).compactMap { LogLine(json: $0) }
                pending.removeSubrange(...lastNewline)
                output.removeAll(keepingCapacity: true)
                write(lines, query: query, into: &output)
                if !output.isEmpty { continuation.yield(ByteBuffer(bytes: output)) }
            }
        } catch is CancellationError {
            return
        } catch {
            if Task.isCancelled { return }
            output.removeAll()
            writeNotice(node: node, reason: "its agent at \(api) stopped answering (\(error))", json: query.json, into: &output)
            continuation.yield(ByteBuffer(bytes: output))
        }
    }

    static func write(_ lines: some Sequence<LogLine>, query: LogQuery, into output: inout [UInt8]) {
        let showingStream = query.streams.count > 1
        for line in lines {
            if query.json { line.writeJSON(into: &output) } else { line.writeText(into: &output, showingStream: showingStream) }
        }
    }

    static func writeNotice(node: String, reason: String, json: Bool, into output: inout [UInt8]) {
        if json {
            output += JSONValue.object(["node": .string(node), "error": .string(reason)]).serialized()
            output.append(UInt8(ascii: "\n"))
        } else {
            output += "# node \(node): \(reason); its lines are missing\n".utf8
        }
    }
}

struct LogPeerError: Error {
    var message: String
}
