import ArgumentParser
import FlotillaCore
import Foundation
import NIOHTTP1

/// The flags every command that starts a deployment shares: `deploy`, `scale`, `restart`,
/// `rollback`, `destroy`. By default the command follows its deployment to the end, so the next
/// command never meets "App is locked by one or more deployments".
struct ChangeOptions: ParsableArguments {
    @Flag(help: "Override a deployment in progress (it is cancelled and this change planned from the current state).")
    var force = false

    @Flag(help: "Return once the change is accepted, without following the deployment.")
    var detach = false

    @Option(help: "Give up following after this many seconds (the deployment goes on).")
    var timeout: Double = 300

    /// Reports the answer to a change (`{"version", "deploymentId"}`) and, unless detached, follows
    /// its deployment until it succeeds (exit 0) or fails (an error with the deployment's reason).
    func follow(
        _ result: JSONValue, client: APIClient, options: ClientOptions, id: String, action: String, removesApp: Bool = false
    ) async throws {
        let deploymentID = result["deploymentId"]?.stringValue ?? result["deployments"]?.arrayValue.first?["id"]?.stringValue ?? ""
        let version = result["version"]?.stringValue ?? ""
        if detach || deploymentID.isEmpty {
            if options.json {
                printJSON(.object(["id": .string(id), "version": .string(version), "deploymentId": .string(deploymentID)]))
            } else {
                print("\(action): version \(version), deployment \(deploymentID)")
            }
            return
        }
        if !options.json { print("\(action) (version \(version), deployment \(deploymentID))") }
        let follower = DeploymentFollower(client: client, quiet: options.json, timeout: timeout)
        let outcome = try await follower.follow(id: id, deploymentID: deploymentID, version: version, removesApp: removesApp)
        if options.json {
            printJSON(.object(["id": .string(id), "version": .string(version), "deploymentId": .string(deploymentID), "status": .string(outcome)]))
        } else {
            print("deployment \(deploymentID) \(outcome)")
        }
    }
}

/// Watches one deployment through `/flotilla/v1/deployments/{id}`, printing each change of
/// progress, and fails with the deployment's own reason (a crash, a check that never passed, the
/// deadline) when it fails.
struct DeploymentFollower {
    let client: APIClient
    let quiet: Bool
    let timeout: Double

    /// - Returns: `succeeded` once the deployment has; throws when it failed or was cancelled.
    func follow(id: String, deploymentID: String, version: String, removesApp: Bool) async throws -> String {
        let deadline = Date().addingTimeInterval(timeout)
        var lastLine = ""
        while Date() < deadline {
            let reply = try await client.request(.GET, "/flotilla/v1/deployments/\(deploymentID)")
            guard reply.status == 200, let deployment = reply.json else { throw CLIError(APIClient.describeError(reply)) }
            switch deployment.text("status") {
            case "succeeded":
                return "succeeded"
            case "failed", "cancelled":
                var message = "deployment \(deploymentID) \(deployment.text("status")): \(deployment.text("reason"))"
                if let rolledBack = deployment["rolledBackTo"]?.stringValue {
                    message += "\nrolled back to the configuration of version \(rolledBack) (deployment \(deployment.text("rollbackDeploymentId")))"
                }
                if quiet { printJSON(deployment) }
                throw CLIError(message)
            default:
                var line = try await progress(id: id, version: version, removesApp: removesApp)
                if let problem = deployment["lastProblem"]?.stringValue { line += "\n  last problem: \(problem)" }
                if line != lastLine && !quiet {
                    print(line)
                    lastLine = line
                }
            }
            try await Task.sleep(for: .milliseconds(300))
        }
        throw CLIError(
            "deployment \(deploymentID) still running after \(Int(timeout)) s (it goes on; see `flotilla deployments`, `flotilla app \(id)`, `flotilla logs \(id) --stderr`)")
    }

    /// One line on where the app's instances are.
    private func progress(id: String, version: String, removesApp: Bool) async throws -> String {
        let instances = try await client.call(.GET, "/flotilla/v1/instances?app=\(id)")["instances"]?.arrayValue ?? []
        if removesApp { return "  \(instances.count) instance(s) still stopping" }
        let app = try await client.call(.GET, APIClient.appPath(id))["app"] ?? .null
        let wanted = app["instances"]?.intValue ?? 0
        let configVersion = app["versionInfo"]?.text("lastConfigChangeAt") ?? version
        let fresh = instances.filter { $0.text("version") >= configVersion && $0.text("goal") == "run" }
        let ready = fresh.filter { $0["ready"] == .bool(true) }.count
        let stopping = instances.filter { $0.text("goal") != "run" }.count
        let old = instances.count - fresh.count - stopping
        var line = "  \(ready)/\(wanted) instance(s) ready, \(fresh.count - ready) starting"
        if old > 0 { line += ", \(old) old still running" }
        if stopping > 0 { line += ", \(stopping) stopping" }
        return line
    }
}
