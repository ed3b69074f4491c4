/// One member of a tar stream, with GNU long names and PAX records already
/// folded in, so consumers never have to know which tar dialect produced it.
public struct TarEntry: Sendable, Equatable {
    /// The tar entry types a container layer can legitimately contain.
    public enum Kind: Sendable, Equatable {
        case regular, hardlink, symlink, characterDevice, blockDevice, directory, fifo
    }

    public var kind: Kind
    /// The name exactly as stored. Kept as bytes because Linux file names need
    /// not be UTF-8, and re-encoding would silently rename files.
    public var pathBytes: [UInt8]
    /// Hardlink or symlink target, as stored (empty for other kinds).
    public var linkTargetBytes: [UInt8]
    /// Number of content bytes that follow the header (always 0 except for `.regular`).
    public var size: Int64
    /// Permission bits including setuid, setgid and sticky (`0o7777` at most).
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    /// Modification time in seconds since the epoch (may be negative).
    public var modificationTime: Int64
    /// Sub-second part of the modification time; PAX headers carry it, ustar does not.
    public var modificationNanoseconds: Int32
    public var deviceMajor: UInt32
    public var deviceMinor: UInt32
    /// Extended attributes from PAX `SCHILY.xattr.*` records (name → raw value).
    /// File capabilities (`security.capability`) travel this way, so they matter.
    public var xattrs: [String: [UInt8]]

    /// The name for display and error messages (invalid UTF-8 is replaced).
    public var path: String { String(decoding: pathBytes, as: UTF8.self) }
    /// The link target for display and error messages.
    public var linkTarget: String { String(decoding: linkTargetBytes, as: UTF8.self) }

    public init(kind: Kind, pathBytes: [UInt8], linkTargetBytes: [UInt8] = [], size: Int64 = 0,
                mode: UInt32 = 0o644, uid: UInt32 = 0, gid: UInt32 = 0,
                modificationTime: Int64 = 0, modificationNanoseconds: Int32 = 0,
                deviceMajor: UInt32 = 0, deviceMinor: UInt32 = 0, xattrs: [String: [UInt8]] = [:]) {
        self.kind = kind
        self.pathBytes = pathBytes
        self.linkTargetBytes = linkTargetBytes
        self.size = size
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.modificationTime = modificationTime
        self.modificationNanoseconds = modificationNanoseconds
        self.deviceMajor = deviceMajor
        self.deviceMinor = deviceMinor
        self.xattrs = xattrs
    }
}
