import FlotillaCore
import Foundation
import Testing

@Suite struct SyslogMessageTests {
    func origin(app: String = "/shop/web") -> SyslogMessage.StructuredData {
        SyslogMessage.StructuredData(
            id: SyslogMessage.structuredDataID,
            parameters: [("app", app), ("instance", "shop_web.1"), ("node", "node-1"), ("stream", "stdout")])
    }

    @Test func formatsRFC5424WithStructuredData() {
        let message = SyslogMessage(
            severity: .informational, millis: 1_717_236_000_123, hostname: "node-1", appName: SyslogMessage.appName(of: "/shop/web"),
            processID: "shop_web.1", structuredData: [origin()], text: Array("GET /cart 200".utf8))
        #expect(
            String(decoding: message.serialized(), as: UTF8.self)
                == #"<14>1 2024-06-01T10:00:00.123Z node-1 shop-web shop_web.1 - [flotilla@32473 app="/shop/web" instance="shop_web.1" node="node-1" stream="stdout"] GET /cart 200"#
        )
        var error = message
        error.severity = .error
        #expect(error.serialized().starts(with: Array("<11>1 ".utf8)))
    }

    @Test func escapesQuotesBackslashesAndBracketsInValues() {
        let message = SyslogMessage(
            severity: .informational, millis: 0, hostname: "n", appName: "a",
            structuredData: [SyslogMessage.StructuredData(id: "x@32473", parameters: [("v", #"a"b\c]d"#)])], text: [])
        #expect(String(decoding: message.serialized(), as: UTF8.self) == #"<14>1 1970-01-01T00:00:00.000Z n a - - [x@32473 v="a\"b\\c\]d"]"#)
    }

    @Test func cleansHeaderFields() {
        let message = SyslogMessage(
            severity: .notice, millis: 0, hostname: "my host", appName: String(repeating: "x", count: 60), processID: "", structuredData: [],
            text: Array("hi".utf8))
        let text = String(decoding: message.serialized(), as: UTF8.self)
        #expect(text == "<13>1 1970-01-01T00:00:00.000Z my_host \(String(repeating: "x", count: 48)) - - - hi")
        #expect(SyslogMessage.appName(of: "/") == "flotilla")
    }

    @Test func cutsLongTextOnACharacterBoundary() {
        let text = Array(String(repeating: "é", count: 100).utf8)  // two bytes each
        let message = SyslogMessage(severity: .informational, millis: 0, hostname: "n", appName: "a", structuredData: [origin()], text: text)
        let whole = message.serialized()
        let cut = message.serialized(maxBytes: whole.count - 3)
        #expect(cut.count == whole.count - 4)
        #expect(String(validating: cut, as: UTF8.self) != nil)
        #expect(message.serialized(maxBytes: whole.count) == whole)
    }

    @Test func octetCountingPrefixesTheLength() {
        #expect(SyslogMessage.octetCounted(Array("<14>1 x".utf8)) == Array("7 <14>1 x".utf8))
        #expect(SyslogMessage.octetCounted(Array("é".utf8)) == Array("2 é".utf8))
    }
}

@Suite struct LogForwardTargetTests {
    @Test func parsesUDPAndTCPWithDefaultPort() throws {
        #expect(try LogForwardTarget.parse("syslog+udp://logs.example:514") == LogForwardTarget(transport: .udp, host: "logs.example", port: 514))
        #expect(try LogForwardTarget.parse("syslog+tcp://10.0.0.5") == LogForwardTarget(transport: .tcp, host: "10.0.0.5", port: 514))
        #expect(try LogForwardTarget.parse("SYSLOG+TCP://127.0.0.1:6514/") == LogForwardTarget(transport: .tcp, host: "127.0.0.1", port: 6514))
        #expect(try LogForwardTarget.parse("syslog+tcp://[::1]:6514") == LogForwardTarget(transport: .tcp, host: "::1", port: 6514))
        #expect(try LogForwardTarget.parse("syslog+tcp://[::1]").description == "syslog+tcp://[::1]:514")
    }

    @Test(arguments: [
        "udp://host:514", "syslog://host", "syslog+udp://", "syslog+udp://host:0", "syslog+udp://host:70000", "syslog+tcp://host:port",
        "syslog+tcp://host:514/path", "syslog+tcp://user@host", "host:514", "syslog+tcp://[::1",
    ])
    func rejects(_ text: String) {
        #expect(throws: FlotillaError.self) { try LogForwardTarget.parse(text) }
    }
}

@Suite struct AgentLogFormatTests {
    let record = AgentLogFormat.Record(
        time: Date(timeIntervalSince1970: 1_717_236_000.123), level: "warning", label: "flotilla", message: #"could not "reach" it"#,
        metadata: [("node", "node-1"), ("data-dir", "/var/lib/flotilla data"), ("empty", ""), ("msg", "shadowed")])

    @Test func logfmtQuotesWhatNeedsIt() {
        #expect(
            AgentLogFormat.logfmt.line(record)
                == #"time=2024-06-01T10:00:00.123Z level=warning label=flotilla msg="could not \"reach\" it" node=node-1 data-dir="/var/lib/flotilla data" empty="""#
                + "\n")
        var multiline = record
        multiline.message = "one\ntwo\u{1}"
        multiline.metadata = []
        #expect(AgentLogFormat.logfmt.line(multiline)?.contains(#"msg="one\ntwo\u0001""#) == true)
    }

    @Test func jsonIsOneObjectALine() throws {
        let line = try #require(AgentLogFormat.json.line(record))
        #expect(line.hasSuffix("\n") && line.dropLast().firstIndex(of: "\n") == nil)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(object["time"] as? String == "2024-06-01T10:00:00.123Z")
        #expect(object["level"] as? String == "warning")
        #expect(object["label"] as? String == "flotilla")
        #expect(object["message"] as? String == #"could not "reach" it"#)
        #expect((object["metadata"] as? [String: String])?["data-dir"] == "/var/lib/flotilla data")
        #expect(AgentLogFormat.text.line(record) == nil)
    }
}
