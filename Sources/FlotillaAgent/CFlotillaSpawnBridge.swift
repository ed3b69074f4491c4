import CFlotillaSpawn

enum CFlotillaSpawnBridge {
    static func pidfd(for pid: Int32) -> Int32 { flotilla_pidfd_open(pid) }
    static func raiseOpenFileLimit() -> Int { flotilla_raise_open_file_limit() }
}
