import Foundation

/// Any key of a JSON object: for finding the fields a type does not know.
struct FieldNames: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }

    /// Refuses a field outside `known` (naming it from the definition's root, `/alerts/0/level`)
    /// and answers the path of what is being decoded, for the caller's own errors.
    static func refuseUnknown(in decoder: any Decoder, known: [String], of what: String) throws -> String {
        let base = decoder.codingPath.map { "/" + ($0.intValue.map(String.init) ?? $0.stringValue) }.joined()
        let unknown = try decoder.container(keyedBy: FieldNames.self).allKeys.map(\.stringValue).filter { !known.contains($0) }
        if let field = unknown.sorted().first {
            throw FlotillaError.invalid([FieldError("\(base)/\(field)", "unknown field of \(what); the fields are: \(known.joined(separator: ", "))")])
        }
        return base
    }
}
