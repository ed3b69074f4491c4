import Foundation

/// A query string as HTML forms and most HTTP clients write it: `+` is a space, the rest
/// percent-encoded. The logs' `grep=` takes text with spaces, which `requests` and browsers send
/// as `+`.
enum FormQuery {
    /// Every parameter, the last value of a repeated one winning.
    static func parameters(_ query: String?) -> [String: String] {
        var parameters: [String: String] = [:]
        for item in (query ?? "").split(separator: "&") {
            let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let name = parts.first.map(decode), !name.isEmpty else { continue }
            parameters[name] = parts.count > 1 ? decode(parts[1]) : ""
        }
        return parameters
    }

    static func decode(_ text: Substring) -> String {
        let spaced = text.replacingOccurrences(of: "+", with: " ")
        return spaced.removingPercentEncoding ?? spaced
    }
}
