import FlotillaCore
import Foundation
import Testing

@Suite struct TimestampTests {
    @Test func formatsInMarathonsShape() {
        let date = Date(timeIntervalSince1970: 1_423_647_083.310)
        #expect(Timestamp.format(date) == "2015-02-11T09:31:23.310Z")
        #expect(Timestamp.format(Date(timeIntervalSince1970: 0)) == "1970-01-01T00:00:00.000Z")
    }

    @Test func parsesWhatItFormats() throws {
        for seconds in [0.0, 951_782_400.5, 1_700_000_000.123, 4_102_444_799.999] {
            let text = Timestamp.format(Date(timeIntervalSince1970: seconds))
            let parsed = try #require(Timestamp.parse(text))
            #expect(abs(parsed.timeIntervalSince1970 - seconds) < 0.001)
        }
        #expect(Timestamp.parse("2015-02-11T09:31:23Z") != nil)
    }

    @Test(arguments: ["", "2015-02-11", "2015-13-11T09:31:23.310Z", "2015-02-11T09:31:23.310+01:00", "not a date at all!!"])
    func rejectsOtherForms(_ text: String) {
        #expect(Timestamp.parse(text) == nil)
    }

    @Test func versionsSortAsTimes() {
        let earlier = Timestamp.format(Date(timeIntervalSince1970: 1_700_000_000.999))
        let later = Timestamp.format(Date(timeIntervalSince1970: 1_700_000_001.000))
        #expect(earlier < later)
    }
}
