import FlotillaCore
import Foundation
import Testing

@Suite struct JSONValueTests {
    @Test func serialisesCompactAndSorted() throws {
        let value = JSONValue.object(["b": .array([.number(1), .number(1.5), .null]), "a": .string("x\"y\n\u{1}")])
        let text = String(decoding: value.serialized(), as: UTF8.self)
        #expect(text == #"{"a":"x\"y\n\u0001","b":[1,1.5,null]}"#)
        #expect(try JSONValue.parse(Data(text.utf8)) == value)
    }

    @Test func malformedInputIsAMalformedError() {
        #expect(throws: FlotillaError.self) { try JSONValue.parse(Data("{bad".utf8)) }
    }
}
