import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A decompressing program (`bzip2 -dc`, `xz -dc`) reading an archive's descriptor. Its standard output
/// is a pipe whose read end, ``outputFD``, is read like a plain tar (with `Decompressor`); the program's
/// exit status is checked by ``finish(success:)``.
final class ArtifactDecompressorProcess {
    private let process = Process()
    private let output = Pipe()
    private let errors: FileHandle
    private let tool: String
    private let what: String

    /// The read end of the program's standard output (closed by ``finish(success:)``).
    var outputFD: Int32 { output.fileHandleForReading.fileDescriptor }

    /// `inputFD` must be positioned at the start of the compressed data; it is not closed here.
    init(tool: String, arguments: [String], inputFD: Int32, what: String) throws {
        self.tool = tool
        self.what = what
        guard let executable = Self.find(tool) else {
            throw ArtifactError(.badArchive, "cannot extract \(what): the '\(tool)' program is not installed on this agent")
        }
        // The tool's stderr goes to an unlinked temporary file, so that it can never block on a full pipe.
        let errorPath = NSTemporaryDirectory() + "/flotilla-\(tool)-\(ArtifactIO.randomSuffix()).err"
        let errorFD = open(errorPath, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard errorFD >= 0 else { throw ArtifactError.posix("cannot create a temporary file for \(tool)") }
        unlink(errorPath)
        errors = FileHandle(fileDescriptor: errorFD, closeOnDealloc: true)
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardInput = FileHandle(fileDescriptor: inputFD, closeOnDealloc: false)
        process.standardOutput = output
        process.standardError = errors
        do {
            try process.run()
        } catch {
            throw ArtifactError(.io, "cannot run \(executable) to extract \(what): \(error.localizedDescription)")
        }
    }

    static func find(_ tool: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let dirs = path.split(separator: ":").map(String.init) + ["/usr/bin", "/bin", "/usr/local/bin", "/opt/homebrew/bin"]
        return dirs.map { "\($0)/\(tool)" }.first { access($0, X_OK) == 0 }
    }

    /// Called once the archive has been read (successfully or not): waits for the program, and after a
    /// success reports its failure (a corrupt stream) as an error.
    func finish(success: Bool) throws {
        var success = success
        if success {
            // What follows the end of a tar archive (padding, usually) is drained so the tool can exit
            // normally; past 16 MiB of it the tool is stopped instead, and its status no longer matters.
            var scratch = [UInt8](repeating: 0, count: 64 * 1024)
            var drained = 0
            while drained < 16 << 20 {
                let n = (try? scratch.withUnsafeMutableBytes { try ArtifactIO.read(outputFD, into: $0, shown: "the output of \(tool)") }) ?? 0
                if n == 0 { break }
                drained += n
            }
            if drained >= 16 << 20 { success = false }
        }
        if process.isRunning, !success {
            process.terminate()
        }
        try? output.fileHandleForReading.close()
        process.waitUntilExit()
        guard success else { return }
        if process.terminationReason != .exit || process.terminationStatus != 0 {
            _ = lseek(errors.fileDescriptor, 0, SEEK_SET)
            let message = String(decoding: (try? errors.read(upToCount: 2000)) ?? Data(), as: UTF8.self)
                .trimmingCharacters(in: .whitespacesAndNewlines)
            throw ArtifactError(.badArchive, "\(what) is corrupt (\(tool) exited with status \(process.terminationStatus)\(message.isEmpty ? "" : ": \(message)"))")
        }
    }
}
