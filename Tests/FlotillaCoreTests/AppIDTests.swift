import FlotillaCore
import Testing

@Suite struct AppIDTests {
    @Test func normalisesPaths() throws {
        #expect(try AppID("shop/cart").path == "/shop/cart")
        #expect(try AppID("/shop/./cart/").path == "/shop/cart")
        #expect(try AppID("/shop/x/../cart").path == "/shop/cart")
        #expect(try AppID("//shop//cart").path == "/shop/cart")
    }

    @Test func derivedNames() throws {
        let id = try AppID("/shop/cart")
        #expect(id.flatName == "shop_cart")
        #expect(id.serviceName == "shop-cart")
    }

    @Test(arguments: ["/Shop", "/shop_cart", "/-shop", "/shop-", "/", "", "/..", "/sh op"])
    func rejectsInvalidIDs(_ raw: String) {
        #expect(throws: FlotillaError.self) { try AppID(raw) }
    }

    @Test func containment() throws {
        #expect(try AppID("/shop").contains(AppID("/shop/cart")))
        #expect(try !AppID("/shop").contains(AppID("/shopping")))
        #expect(try !AppID("/shop/cart").contains(AppID("/shop")))
    }
}
