import CFlotillaSpawn

enum CFlotillaSpawnBridge {
    static func pidfd(for pid: Int32) -> Int32 { flotilla_pidfd_open(pid) }
}
