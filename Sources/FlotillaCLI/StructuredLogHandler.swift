import FlotillaCore
import Foundation
import Logging
import Synchronization

/// The agent's log lines in `--log-format logfmt` or `json` (`AgentLogFormat`), one a line on
/// standard error, each written whole with one `write` so lines from many tasks never interleave.
struct StructuredLogHandler: LogHandler {
    let label: String
    let format: AgentLogFormat
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    init(label: String, format: AgentLogFormat, metadataProvider: Logger.MetadataProvider? = LoggingSystem.metadataProvider) {
        self.label = label
        self.format = format
        self.metadataProvider = metadataProvider
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { _, new in new } }
        if let extra = event.metadata { merged.merge(extra) { _, new in new } }
        let record = AgentLogFormat.Record(
            time: Date(), level: event.level.rawValue, label: label, message: event.message.description,
            metadata: merged.sorted { $0.key < $1.key }.map { ($0.key, $0.value.description) })
        guard let line = format.line(record) else { return }
        Self.lock.withLock { _ in
            var bytes = Array(line.utf8)
            var written = 0
            while written < bytes.count {
                let result = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress! + written, $0.count - written) }
                if result <= 0 { break }
                written += result
            }
        }
    }

    private static let lock = Mutex(())
}
