import ArgumentParser
import FlotillaCore
import Foundation
import NIOCore
import NIOHTTP1

struct ImagesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "images", abstract: "List the images in the agent's image store.")
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let images = try await options.client().call(.GET, "/flotilla/v1/images")
        if options.json { return printJSON(images) }
        printTable(
            ["IMAGE", "ID", "SIZE", "LAYERS", "USED BY"],
            images.arrayValue.map { image in
                let references = image["references"]?.arrayValue.compactMap(\.stringValue) ?? []
                return [
                    references.isEmpty ? "<none>" : references.joined(separator: ","), String(image.text("id").dropFirst("sha256:".count).prefix(12)),
                    ImageCommand.megabytes(image["size"]?.intValue ?? 0), "\(image["layers"]?.intValue ?? 0)",
                    image["usedBy"]?.arrayValue.compactMap(\.stringValue).joined(separator: ",") ?? "",
                ]
            })
    }
}

struct ImageCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image", abstract: "Fill or tidy the agent's image store.", subcommands: [Pull.self, Import.self, Prune.self])

    static func megabytes(_ bytes: Int) -> String { String(format: "%.1f MB", Double(bytes) / 1_000_000) }

    struct Pull: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Pull an image from its registry, showing the bytes as they arrive.")
        @Argument(help: "The image reference (registry:5000/shop/cart:1.4, busybox, …@sha256:…).") var reference: String
        @OptionGroup var options: ClientOptions

        func run() async throws {
            var pending = Data()
            var final: JSONValue?
            var failure: String?
            var lastShown = ""
            try await options.client().stream("/flotilla/v1/images/pull", method: .POST, json: ["image": .string(reference)]) { chunk in
                pending.append(contentsOf: chunk.readableBytesView)
                while let newline = pending.firstIndex(of: 0x0A) {
                    let line = pending[pending.startIndex..<newline]
                    pending.removeSubrange(pending.startIndex...newline)
                    guard let event = try? JSONValue.parse(Data(line)) else { continue }
                    if let error = event["error"]?.stringValue {
                        failure = error
                    } else if let image = event["image"] {
                        final = image
                    } else if !options.json, let message = event["message"]?.stringValue, message != lastShown {
                        lastShown = message
                        FileHandle.standardError.write(Data((message + "\n").utf8))
                    }
                }
            }
            if let failure { throw CLIError(failure) }
            guard let final else { throw CLIError("the agent ended the pull without an answer; see its log") }
            if options.json { return printJSON(final) }
            print("\(final["references"]?.arrayValue.first?.stringValue ?? reference) \(final.text("id"))")
        }
    }

    struct Import: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Import a `docker save` tarball or an OCI image layout (a directory, or a tar of one).",
            discussion: "A file is uploaded to the agent; a directory is read by the agent itself, so it must be on the agent's node.")
        @Argument(help: "The archive or layout.") var file: String
        @Option(help: "The reference to give the image (registry/repository:tag) when the archive names none.") var name: String?
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let path = URL(fileURLWithPath: file).standardizedFileURL.path
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { throw CLIError("\(file) does not exist") }
            var query = name.map { "name=" + ($0.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? $0) } ?? ""
            let client = try options.client()
            let reply: APIClient.Reply
            if isDirectory.boolValue {
                query += (query.isEmpty ? "" : "&") + "path=" + (path.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? path)
                reply = try await client.request(.POST, "/flotilla/v1/images/import?" + query, timeout: .hours(1))
            } else {
                reply = try await client.upload("/flotilla/v1/images/import" + (query.isEmpty ? "" : "?" + query), file: path)
            }
            guard (200..<300).contains(reply.status), let images = reply.json else { throw CLIError(APIClient.describeError(reply)) }
            if options.json { return printJSON(images) }
            for image in images.arrayValue {
                let references = image["references"]?.arrayValue.compactMap(\.stringValue) ?? []
                print("imported \(references.isEmpty ? "<none>" : references.joined(separator: ",")) \(image.text("id"))")
            }
        }
    }

    struct Prune: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove the images no app version uses, and the layers only they used.")
        @OptionGroup var options: ClientOptions

        func run() async throws {
            let result = try await options.client().call(.POST, "/flotilla/v1/images/prune")
            if options.json { return printJSON(result) }
            for image in result["removed"]?.arrayValue ?? [] {
                let references = image["references"]?.arrayValue.compactMap(\.stringValue) ?? []
                print("removed \(references.isEmpty ? "<none>" : references.joined(separator: ",")) \(image.text("id"))")
            }
            print("freed \(ImageCommand.megabytes(result["bytesFreed"]?.intValue ?? 0))")
        }
    }
}
