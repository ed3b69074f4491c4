import FlotillaAPI
import FlotillaControl
import FlotillaCore
import FlotillaStore
import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import NIOCore
import Testing

/// The Marathon routes over a control plane on an in-memory store, with no agent: what the API
/// accepts, rejects and answers, in Marathon's shapes.
@Suite struct MarathonAPITests {
    func withAPI(_ body: @Sendable (any TestClientProtocol) async throws -> Void) async throws {
        let events = EventBus()
        let control = ControlPlane(store: InMemoryStateStore(), events: events, logger: Logger(label: "test"))
        try await control.load()
        let loop = Task { try await control.run() }
        defer { loop.cancel() }
        let router = Router()
        MarathonRoutes(control: control, events: events, info: .init(version: "test", leader: "127.0.0.1:7600", nodeName: "n", httpPort: 7600))
            .add(to: router)
        try await Application(router: router).test(.router) { client in try await body(client) }
    }

    func json(_ buffer: ByteBuffer) -> JSONValue { (try? JSONValue.parse(Data(buffer.readableBytesView))) ?? .null }

    func body(_ text: String) -> ByteBuffer { ByteBuffer(string: text) }

    @Test func createsAnAppAndAnswersInMarathonsShape() async throws {
        try await withAPI { client in
            try await client.execute(uri: "/v2/apps", method: .post, body: body(#"{"id": "/shop/cart", "cmd": "serve", "instances": 2}"#)) { response in
                #expect(response.status == .created)
                #expect(response.headers[.location] == "/v2/apps/shop/cart")
                let app = json(response.body)
                #expect(app["id"] == .string("/shop/cart"))
                #expect(app["instances"] == .number(2))
                #expect(app["deployments"].map { if case .array(let items) = $0 { return items.count } else { return 0 } } == 1)
            }
            try await client.execute(uri: "/v2/apps//shop/cart", method: .get) { response in
                #expect(response.status == .ok)
                #expect(json(response.body)["app"]?["cmd"] == .string("serve"))
            }
            try await client.execute(uri: "/v2/apps/shop/cart/versions", method: .get) { response in
                guard case .array(let versions)? = json(response.body)["versions"] else { Issue.record("no versions"); return }
                #expect(versions.count == 1)
            }
        }
    }

    @Test func malformedBodiesAre400() async throws {
        try await withAPI { client in
            for text in ["{bad", "[1, 2]", ""] {
                try await client.execute(uri: "/v2/apps", method: .post, body: body(text)) { response in
                    #expect(response.status == .badRequest)
                    #expect(json(response.body)["message"]?.stringValue?.isEmpty == false)
                }
            }
        }
    }

    @Test func invalidDefinitionsAre422WithTheField() async throws {
        try await withAPI { client in
            try await client.execute(uri: "/v2/apps", method: .post, body: body(#"{"id": "/x", "cmd": "a", "instances": -1}"#)) { response in
                #expect(response.status == .unprocessableContent)
                let error = json(response.body)
                guard case .array(let details)? = error["details"] else { Issue.record("no details"); return }
                #expect(details.first?["path"] == .string("/instances"))
            }
            try await client.execute(uri: "/v2/apps", method: .post, body: body(#"{"id": "/Bad_Id", "cmd": "a"}"#)) { response in
                #expect(response.status == .unprocessableContent)
            }
            // Nothing was half-applied.
            try await client.execute(uri: "/v2/apps", method: .get) { response in
                #expect(json(response.body)["apps"] == .array([]))
            }
        }
    }

    @Test func unknownThingsAre404() async throws {
        try await withAPI { client in
            for (uri, method) in [("/v2/apps/nope", HTTPRequest.Method.get), ("/v2/apps/nope", .delete), ("/v2/apps/nope/tasks", .get),
                                  ("/v2/apps/nope/versions/2020-01-01T00:00:00.000Z", .get), ("/v2/deployments/nope", .delete)] {
                try await client.execute(uri: uri, method: method) { response in
                    #expect(response.status == .notFound, "\(method) \(uri)")
                }
            }
        }
    }

    @Test func duplicatesAndLockedAppsAre409() async throws {
        try await withAPI { client in
            let definition = #"{"id": "/web", "cmd": "serve"}"#
            try await client.execute(uri: "/v2/apps", method: .post, body: body(definition)) { #expect($0.status == .created) }
            try await client.execute(uri: "/v2/apps", method: .post, body: body(definition)) { #expect($0.status == .conflict) }
            // No agent runs the instance, so the first deployment is still in progress.
            try await client.execute(uri: "/v2/apps/web", method: .put, body: body(#"{"instances": 3}"#)) { response in
                #expect(response.status == .conflict)
                #expect(json(response.body)["message"]?.stringValue?.contains("force=true") == true)
            }
            try await client.execute(uri: "/v2/apps/web?force=true", method: .put, body: body(#"{"instances": 3}"#)) { response in
                #expect(response.status == .ok)
                #expect(json(response.body)["deploymentId"]?.stringValue != nil)
            }
            try await client.execute(uri: "/v2/deployments", method: .get) { response in
                guard case .array(let deployments) = json(response.body) else { Issue.record("not a list"); return }
                #expect(deployments.count == 1)
            }
        }
    }

    @Test func partialUpdatesKeepOtherFieldsAndRollbackRestores() async throws {
        try await withAPI { client in
            try await client.execute(uri: "/v2/apps", method: .post, body: body(#"{"id": "/web", "cmd": "v1", "env": {"A": "1"}, "instances": 0}"#)) { _ in }
            var first = ""
            try await client.execute(uri: "/v2/apps/web/versions", method: .get) { response in
                first = json(response.body)["versions"].flatMap { if case .array(let items) = $0 { return items.first?.stringValue } else { return nil } } ?? ""
            }
            try await client.execute(uri: "/v2/apps/web?force=true", method: .put, body: body(#"{"cmd": "v2"}"#)) { #expect($0.status == .ok) }
            try await client.execute(uri: "/v2/apps/web", method: .get) { response in
                let app = json(response.body)["app"]
                #expect(app?["cmd"] == .string("v2"))
                #expect(app?["env"]?["A"] == .string("1"))
            }
            try await client.execute(uri: "/v2/apps/web?force=true", method: .put, body: body(#"{"version": "\#(first)"}"#)) { #expect($0.status == .ok) }
            try await client.execute(uri: "/v2/apps/web", method: .get) { response in
                #expect(json(response.body)["app"]?["cmd"] == .string("v1"))
            }
            try await client.execute(uri: "/v2/apps/web?force=true", method: .put, body: body(#"{"version": "1999-01-01T00:00:00.000Z"}"#)) {
                #expect($0.status == .notFound)
            }
        }
    }

    @Test func oversizedBodiesAre413() async throws {
        try await withAPI { client in
            let huge = #"{"id": "/web", "cmd": ""# + String(repeating: "x", count: 2 << 20) + #""}"#
            try await client.execute(uri: "/v2/apps", method: .post, body: body(huge)) { response in
                #expect(response.status == .contentTooLarge)
            }
            try await client.execute(uri: "/ping", method: .get) { #expect($0.status == .ok) }
        }
    }

    @Test func unplaceableAppsAreQueuedWithTheReason() async throws {
        try await withAPI { client in
            try await client.execute(uri: "/v2/apps", method: .post, body: body(#"{"id": "/web", "cmd": "serve"}"#)) { _ in }
            // No node has registered: after a reconcile pass, the instance waits in the queue.
            var queued = false
            for _ in 0..<50 where !queued {
                try await client.execute(uri: "/v2/queue", method: .get) { response in
                    if case .array(let items)? = json(response.body)["queue"], let item = items.first {
                        queued = item["count"] == .number(1) && item["processedOffersSummary"]?["reason"]?.stringValue?.contains("no node") == true
                    }
                }
                if !queued { try await Task.sleep(for: .milliseconds(50)) }
            }
            #expect(queued)
        }
    }
}
