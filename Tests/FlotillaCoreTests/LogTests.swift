import FlotillaCore
import Foundation
import Testing

@Suite struct LogDurationTests {
    @Test func readsGoDurationsAndDays() {
        #expect(LogDuration.seconds("10m") == 600)
        #expect(LogDuration.seconds("1h30m") == 5400)
        #expect(LogDuration.seconds("250ms") == 0.25)
        #expect(LogDuration.seconds("7d") == 604_800)
        #expect(LogDuration.seconds("1d12h") == 129_600)
        #expect(LogDuration.seconds("45") == 45)
        #expect(LogDuration.seconds("ten minutes") == nil)
        #expect(LogDuration.seconds("5x") == nil)
        #expect(LogDuration.seconds("d") == nil)
    }

    @Test func retentionTakesAnAgeASizeOrBoth() throws {
        #expect(try LogRetention.parse("7d") == LogRetention(age: 7 * 86_400, bytes: nil))
        #expect(try LogRetention.parse("500MB") == LogRetention(age: nil, bytes: 500_000_000))
        #expect(try LogRetention.parse("7d,1GiB") == LogRetention(age: 7 * 86_400, bytes: 1 << 30))
        #expect(try LogRetention.parse("1GiB, 12h") == LogRetention(age: 43_200, bytes: 1 << 30))
        // `m` is minutes, never mebibytes.
        #expect(try LogRetention.parse("30m") == LogRetention(age: 1800, bytes: nil))
        #expect(throws: FlotillaError.self) { try LogRetention.parse("soon") }
        #expect(throws: FlotillaError.self) { try LogRetention.parse("1d,2d") }
        #expect(throws: FlotillaError.self) { try LogRetention.parse("") }
    }
}

@Suite struct LogTimeIndexTests {
    let index = LogTimeIndex.parse(Array("100 1000\n250 2000\n250 2500\n400 3000\nrubbish\n90 9000\n".utf8))

    @Test func parsesAndSkipsWhatGoesBackwards() {
        #expect(index.entries == [.init(endOffset: 100, millis: 1000), .init(endOffset: 250, millis: 2000), .init(endOffset: 400, millis: 3000)])
    }

    @Test func datesALineByTheFirstSampleThatSawItWhole() {
        #expect(index.millis(forLineEndingAt: 1) == 1000)
        #expect(index.millis(forLineEndingAt: 100) == 1000)
        #expect(index.millis(forLineEndingAt: 101) == 2000)
        #expect(index.millis(forLineEndingAt: 400) == 3000)
        #expect(index.millis(forLineEndingAt: 401) == nil)
    }

    @Test func findsWhereLinesOfATimeBegin() {
        #expect(index.offset(forLinesFrom: 0) == 0)
        #expect(index.offset(forLinesFrom: 1000) == 0)
        #expect(index.offset(forLinesFrom: 1001) == 100)
        #expect(index.offset(forLinesFrom: 2500) == 250)
        #expect(index.offset(forLinesFrom: 9999) == 400)
    }

    @Test func aLineOfTheIndexReadsBack() {
        let text = LogTimeIndex.line(endOffset: 42, millis: 1_717_236_000_123)
        #expect(text == "42 1717236000123\n")
        #expect(LogTimeIndex.parse(Array(text.utf8)).entries == [.init(endOffset: 42, millis: 1_717_236_000_123)])
    }
}

@Suite struct LogQueryTests {
    let now = Date(timeIntervalSince1970: 1_000_000)

    func line(_ text: String, at millis: Int64 = 999_000_000) -> LogLine {
        LogLine(millis: millis, instance: "shop_cart.1", app: "/shop/cart", node: "n1", stream: .stdout, text: text)
    }

    @Test func readsTheParameters() throws {
        let query = try LogQuery(parameters: ["stream": "stderr", "since": "10m", "until": "2024-06-01T10:00:00Z", "lines": "5", "follow": "true", "format": "json"], now: now)
        #expect(query.streams == [.stderr])
        #expect(query.sinceMillis == 999_400_000)
        #expect(query.untilMillis == 1_717_236_000_000)
        #expect(query.lines == 5 && query.follow && query.json)
        let defaults = try LogQuery(parameters: [:], now: now)
        #expect(defaults.streams == [.stdout, .stderr] && defaults.lines == 100 && !defaults.follow && !defaults.json)
        #expect(try LogQuery(parameters: ["since": "2024-06-01T12:00:00+02:00"]).sinceMillis == 1_717_236_000_000)
    }

    @Test func badInputSaysWhatWasWrong() {
        for parameters in [["stream": "stdin"], ["since": "yesterday"], ["until": "5 minutes"], ["lines": "-1"], ["grep": "(", "regex": "true"], ["format": "xml"], ["follow": "maybe"]] {
            #expect(throws: FlotillaError.self) { try LogQuery(parameters: parameters, now: now) }
        }
    }

    @Test func filtersByTimeAndText() throws {
        let query = try LogQuery(parameters: ["since": "1000s", "until": "1s", "grep": "ERROR"], now: now)
        #expect(query.matches(line("an ERROR here", at: 999_500_000)))
        #expect(!query.matches(line("all fine", at: 999_500_000)))
        #expect(!query.matches(line("an ERROR too early", at: 998_000_000)))
        #expect(!query.matches(line("an ERROR too late", at: 999_999_500)))
    }

    @Test func grepIsASubstringUnlessRegexIsTrue() throws {
        let plain = try LogQuery(parameters: ["grep": "/health/"], now: now)
        #expect(plain.matches(line("GET /health/ 200")))
        #expect(!plain.matches(line("GET /healthz 200")))
        let regex = try LogQuery(parameters: ["grep": "^GET /health[a-z]* (2|3)\\d\\d$", "regex": "true"], now: now)
        #expect(regex.matches(line("GET /healthz 200")))
        #expect(!regex.matches(line("GET /healthz 500")))
    }
}

@Suite struct LogLineTests {
    func line(_ instance: String, _ millis: Int64, _ text: String) -> LogLine {
        LogLine(millis: millis, instance: instance, app: "/shop/cart", node: "n1", stream: .stdout, text: text)
    }

    @Test func mergesByTimeKeepingEachSourcesOrder() {
        let a = [line("a", 1, "a1"), line("a", 5, "a2"), line("a", 5, "a3")]
        let b = [line("b", 2, "b1"), line("b", 5, "b2"), line("b", 9, "b3")]
        // A source whose times do not rise (an unsampled tail dated by mtime) keeps its order.
        let c = [line("c", 7, "c1"), line("c", 3, "c2")]
        #expect(LogLine.merge([a, b, c]).map(\.text) == ["a1", "b1", "a2", "a3", "b2", "c1", "c2", "b3"])
        #expect(LogLine.merge([]).isEmpty)
    }

    @Test func writesTextAndJSONAndReadsJSONBack() throws {
        var sample = line("shop_cart.1", 1_717_236_000_123, "say \"hi\"\tthere")
        sample.stream = .stderr
        var text: [UInt8] = []
        sample.writeText(into: &text, showingStream: true)
        #expect(String(decoding: text, as: UTF8.self) == "2024-06-01T10:00:00.123Z shop_cart.1:stderr say \"hi\"\tthere\n")
        var json: [UInt8] = []
        sample.writeJSON(into: &json)
        #expect(json.last == UInt8(ascii: "\n"))
        #expect(LogLine(json: json.dropLast()) == sample)
        #expect(LogLine(json: Array(#"{"node":"n2","error":"down"}"#.utf8)) == nil)
    }

    @Test func findsTheAppOfAnInstanceThatIsGone() {
        #expect(LogLine.appID(ofInstance: "shop_cart.6f1c2b9e-0000-4000-8000-000000000000") == "/shop/cart")
        #expect(LogLine.appID(ofInstance: "web.v2.6f1c") == "/web.v2")
    }
}
