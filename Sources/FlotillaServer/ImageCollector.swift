import FlotillaAPI
import FlotillaControl
import FlotillaImage
import Foundation
import Glibc
import Logging
import ServiceLifecycle

/// Prunes the image store by itself when the disk it lives on fills past a threshold
/// (`--image-gc-threshold`), as kubelet's image garbage collection does: images no app version
/// names go first (all of them: the store keeps no recency order worth more than an app's own).
struct ImageCollector: Service {
    let control: ControlPlane
    let images: ImageStore
    /// Percent of the filesystem in use above which unreferenced images are removed; nil: never.
    let thresholdPercent: Double?
    let interval: Duration
    let logger: Logger

    func run() async throws {
        guard let thresholdPercent else { return }
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            // A shutdown must not wait out the interval.
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: interval) }
            if Task.isCancelled || Task.isShuttingDownGracefully { return }
            guard let used = Self.usedPercent(of: images.root), used > thresholdPercent else { continue }
            do {
                let keep = Set(try await ImageRoutes.referencedImages(control).keys)
                let (removed, bytes) = await images.prune(keeping: keep)
                if !removed.isEmpty || bytes > 0 {
                    logger.notice(
                        "disk \(Int(used))% full (threshold \(Int(thresholdPercent))%): removed \(removed.count) unused image(s), \(bytes / 1_000_000) MB")
                }
            } catch {
                logger.warning("image garbage collection failed: \(error)")
            }
        }
    }

    /// How full the filesystem holding `path` is, in percent of what non-root users may use.
    static func usedPercent(of path: String) -> Double? {
        var info = statvfs()
        guard statvfs(path, &info) == 0, info.f_blocks > 0 else { return nil }
        let total = Double(info.f_blocks), available = Double(info.f_bavail), free = Double(info.f_bfree)
        let used = total - free
        return used / (used + available) * 100
    }
}
