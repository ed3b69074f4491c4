import FlotillaAPI
import FlotillaSecrets
import HTTPTypes
import Testing

@Suite struct ACLRequirementTests {
    func of(_ method: HTTPRequest.Method, _ path: String, _ query: String? = nil) -> ACLRequirement {
        ACLRequirement.of(method: method, path: path, query: query)
    }

    @Test func everySurfaceMapsOntoOnePathSpace() {
        #expect(of(.get, "/ping") == .none)
        #expect(of(.put, "/v1/acl/bootstrap") == .none)
        #expect(of(.get, "/v1/auth/token/lookup-self") == .anyToken)
        #expect(of(.get, "/v1/secret/data/shop/db") == .capability(path: "secret/data/shop/db", anyOf: [.read]))
        #expect(of(.post, "/v1/secret/data/shop/db") == .capability(path: "secret/data/shop/db", anyOf: [.create, .update]))
        #expect(of(.get, "/v1/secret/metadata/shop", "list=true") == .capability(path: "secret/metadata/shop", anyOf: [.list, .read]))
        #expect(of(.get, "/v1/kv/shop/config") == .capability(path: "consul/kv/shop/config", anyOf: [.read]))
        #expect(of(.get, "/v1/kv/shop/", "recurse") == .capability(path: "consul/kv/shop/", anyOf: [.list, .read]))
        #expect(of(.put, "/v1/kv/shop/config") == .capability(path: "consul/kv/shop/config", anyOf: [.create, .update]))
        #expect(of(.get, "/v1/health/service/web") == .capability(path: "consul/service/web", anyOf: [.read]))
        #expect(of(.get, "/v1/catalog/services") == .capability(path: "consul/service/", anyOf: [.list, .read]))
        #expect(of(.put, "/v1/agent/service/register") == .capability(path: "consul/service/", anyOf: [.update]))
        #expect(of(.post, "/v2/apps") == .marathonCreate(kind: "apps"))
        #expect(of(.get, "/v2/apps/shop/cart") == .capability(path: "marathon/apps/shop/cart", anyOf: [.read]))
        #expect(of(.get, "/v2/apps/shop/cart/tasks") == .capability(path: "marathon/apps/shop/cart", anyOf: [.read]))
        #expect(of(.post, "/v2/apps/shop/cart/restart") == .capability(path: "marathon/apps/shop/cart", anyOf: [.update]))
        #expect(of(.delete, "/v2/apps/shop/cart") == .capability(path: "marathon/apps/shop/cart", anyOf: [.delete]))
        #expect(of(.get, "/v2/apps") == .capability(path: "marathon/apps", anyOf: [.read]))
        #expect(of(.get, "/flotilla/v1/logs") == .capability(path: "flotilla/logs", anyOf: [.read]))
        #expect(of(.get, "/flotilla/v1/logs/shop_cart.1234") == .capability(path: "flotilla/logs/shop_cart.1234", anyOf: [.read]))
        // An app's merged logs are read with the app's own read permission.
        #expect(of(.get, "/flotilla/v1/logs", "app=/shop/cart&follow=true") == .capability(path: "marathon/apps/shop/cart", anyOf: [.read]))
        #expect(of(.get, "/flotilla/v1/logs", "grep=x&app=%2Fshop%2Fcart") == .capability(path: "marathon/apps/shop/cart", anyOf: [.read]))
        #expect(of(.get, "/metrics") == .capability(path: "sys/metrics", anyOf: [.read]))
        #expect(of(.put, "/v1/sys/policies/acl/reader") == .capability(path: "sys/policies/acl/reader", anyOf: [.create, .update]))
    }
}
