import FlotillaAgent
import FlotillaCore
import Foundation
import Testing

@Suite struct LogRetentionPlanTests {
    let now = Date(timeIntervalSince1970: 1_000_000)

    func file(_ path: String, bytes: Int64, ageSeconds: Double, inUse: Bool = false) -> LogRetentionPlan.File {
        .init(path: path, bytes: bytes, modified: now.addingTimeInterval(-ageSeconds), inUse: inUse)
    }

    @Test func removesWhatPassedTheAgeButNeverAFileInUse() {
        let files = [
            file("a/stdout", bytes: 10, ageSeconds: 9000, inUse: true), file("a/stdout.1", bytes: 10, ageSeconds: 9000),
            file("b/stdout", bytes: 10, ageSeconds: 7000), file("c/stdout", bytes: 10, ageSeconds: 10),
        ]
        #expect(LogRetentionPlan(retention: LogRetention(age: 3600)).expired(files, now: now) == ["a/stdout.1", "b/stdout"])
    }

    @Test func removesTheOldestUntilTheNodeFitsItsSize() {
        let files = [
            file("a/stdout", bytes: 600, ageSeconds: 1, inUse: true), file("a/stdout.1", bytes: 300, ageSeconds: 50),
            file("b/stderr", bytes: 300, ageSeconds: 100), file("c/stdout", bytes: 100, ageSeconds: 10),
        ]
        // 1,300 bytes for a budget of 900: the oldest (b, then a's rotated one) go; then c fits.
        #expect(LogRetentionPlan(retention: LogRetention(bytes: 900)).expired(files, now: now) == ["b/stderr", "a/stdout.1"])
        #expect(LogRetentionPlan(retention: LogRetention(bytes: 1000)).expired(files, now: now) == ["b/stderr"])
        #expect(LogRetentionPlan(retention: LogRetention(bytes: 10_000)).expired(files, now: now).isEmpty)
    }

    @Test func knowsLogFilesFromTheRestOfASandbox() {
        for name in ["stdout", "stderr", "stdout.1", "stderr.12", "stdout.times", "stdout.3.times"] { #expect(LogRetentionPlan.isLogFile(name)) }
        for name in ["app.jar", "stdout.old", "stdoutx", "config.times", "stdout.1.bak"] { #expect(!LogRetentionPlan.isLogFile(name)) }
    }
}
