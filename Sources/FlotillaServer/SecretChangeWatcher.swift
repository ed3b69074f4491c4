import FlotillaControl
import FlotillaCore
import FlotillaSecrets
import Logging
import ServiceLifecycle

/// Restarts apps that ask for it (`restartOnSecretChange`) when a secret they use gets a new
/// version or loses its current one: a rolling restart through a normal deployment, so health
/// gating and rollback apply as to any restart.
struct SecretChangeWatcher: Service {
    let kv: SecretKV
    let control: ControlPlane
    let logger: Logger

    func run() async throws {
        var known = try await kv.currentVersions()
        var index = try await kv.currentIndex()
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            do {
                let seen = index
                index = try await cancelWhenGracefulShutdown { try await kv.waitForChange(after: seen, timeout: .seconds(60)) }
                let now = try await kv.currentVersions()
                let changed = Set(now.keys).union(known.keys).filter { now[$0] != known[$0] }
                known = now
                guard !changed.isEmpty else { continue }
                for (id, record) in await control.snapshot().apps where record.definition.restartOnSecretChange {
                    let used = Set(record.definition.secrets.values.compactMap { $0.path?.path })
                    let touched = used.intersection(changed)
                    guard !touched.isEmpty else { continue }
                    do {
                        let result = try await control.restart(id, force: false)
                        logger.info("\(id): restarting (deployment \(result.deploymentID)): secret \(touched.sorted().joined(separator: ", ")) changed")
                    } catch {
                        logger.warning("\(id): a secret it uses changed, and its restart was refused: \(error)")
                    }
                }
            } catch is CancellationError {
                return
            } catch {
                logger.error("watching secrets for restartOnSecretChange failed, retrying: \(error)")
                try? await Task.sleep(for: .seconds(1))
            }
        }
    }
}
