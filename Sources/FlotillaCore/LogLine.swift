import Foundation

public enum LogStream: String, Sendable, CaseIterable {
    case stdout, stderr
}

/// One line an instance wrote, with where and when: what `GET /flotilla/v1/logs?app=` merges.
public struct LogLine: Sendable, Equatable {
    /// When the agent saw the line (`LogTimeIndex`), milliseconds since 1970.
    public var millis: Int64
    public var instance: String
    public var app: String
    public var node: String
    public var stream: LogStream
    /// Without its newline.
    public var text: String

    public init(millis: Int64, instance: String, app: String, node: String, stream: LogStream, text: String) {
        self.millis = millis
        self.instance = instance
        self.app = app
        self.node = node
        self.stream = stream
        self.text = text
    }

    public var time: String { Timestamp.format(Date(timeIntervalSince1970: Double(millis) / 1000)) }

    /// `2024-06-01T10:00:00.123Z _shop_cart.6f1c… line`; with both streams asked for, the stream
    /// follows the instance (`_shop_cart.6f1c…:stderr`).
    public func writeText(into output: inout [UInt8], showingStream: Bool) {
        output.append(contentsOf: time.utf8)
        output.append(UInt8(ascii: " "))
        output.append(contentsOf: instance.utf8)
        if showingStream {
            output.append(UInt8(ascii: ":"))
            output.append(contentsOf: stream.rawValue.utf8)
        }
        output.append(UInt8(ascii: " "))
        output.append(contentsOf: text.utf8)
        output.append(UInt8(ascii: "\n"))
    }

    /// One NDJSON object: `{"time","instance","app","node","stream","line"}` and a newline.
    public func writeJSON(into output: inout [UInt8]) {
        let fields: [(String, String)] = [
            ("time", time), ("instance", instance), ("app", app), ("node", node), ("stream", stream.rawValue), ("line", text),
        ]
        output.append(UInt8(ascii: "{"))
        for (index, (name, value)) in fields.enumerated() {
            if index > 0 { output.append(UInt8(ascii: ",")) }
            JSONValue.writeString(name, into: &output)
            output.append(UInt8(ascii: ":"))
            JSONValue.writeString(value, into: &output)
        }
        output.append(contentsOf: "}\n".utf8)
    }

    /// Reads back one object `writeJSON` wrote (another agent's answer); nil for anything else,
    /// such as a notice about a node that did not answer.
    public init?(json: some Collection<UInt8>) {
        guard let value = try? JSONValue.parse(Data(json)), let text = value["line"]?.stringValue,
            let time = value["time"]?.stringValue.flatMap(Timestamp.parse),
            let stream = value["stream"]?.stringValue.flatMap(LogStream.init(rawValue:)),
            let instance = value["instance"]?.stringValue
        else { return nil }
        self.init(
            millis: Int64((time.timeIntervalSince1970 * 1000).rounded()), instance: instance, app: value["app"]?.stringValue ?? "",
            node: value["node"]?.stringValue ?? "", stream: stream, text: text)
    }

    /// The app an instance id belongs to: `shop_cart.<uuid>` is `/shop/cart` (app ids have no `_`),
    /// so the logs of an instance that is gone still find their app.
    public static func appID(ofInstance id: String) -> String? {
        InstanceSpec.appFlatName(ofInstanceID: id).map { "/" + $0.replacingOccurrences(of: "_", with: "/") }
    }

    /// Merges sources (each in its own order, times non-decreasing: one file of one instance) into
    /// one sequence by time. A source's lines keep their order even where its times do not rise;
    /// equal times go in the order of the sources. Costs O(lines × sources), sources being few.
    public static func merge(_ sources: [[LogLine]]) -> [LogLine] {
        var heads = [Int](repeating: 0, count: sources.count)
        var merged: [LogLine] = []
        merged.reserveCapacity(sources.reduce(0) { $0 + $1.count })
        while true {
            var best = -1
            for source in sources.indices where heads[source] < sources[source].count {
                if best < 0 || sources[source][heads[source]].millis < sources[best][heads[best]].millis { best = source }
            }
            guard best >= 0 else { return merged }
            merged.append(sources[best][heads[best]])
            heads[best] += 1
        }
    }
}
