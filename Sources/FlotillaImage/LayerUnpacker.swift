import CFlotillaArchive
import Glibc

/// Unpacks one OCI/Docker image layer into a directory.
///
/// A layer is untrusted bytes from a registry, so the point of this type is
/// that no entry can touch anything outside the target directory: paths are
/// checked lexically (no absolute paths, no `..`), every parent directory is
/// opened component by component with `O_NOFOLLOW` from a descriptor of the
/// root (so a symlink planted by an earlier entry or layer is never written
/// through), files are created with `O_EXCL | O_NOFOLLOW`, and link targets
/// are validated before anything is linked.
public struct LayerUnpacker: Sendable {
    /// How layers are combined, which decides what whiteouts turn into.
    public enum Mode: Sendable, Equatable {
        /// The directory becomes one overlayfs lower layer of its own: whiteouts
        /// become 0/0 character devices and opaque markers become the
        /// `trusted.overlay.opaque` xattr, as the kernel expects. Needs root.
        case overlay
        /// Layers are unpacked one after another into the same directory (for
        /// hosts without overlayfs): whiteouts delete what lower layers wrote.
        case apply
    }

    /// What happened, for logs and metrics; warnings are things that were
    /// deliberately not reproduced (e.g. devices when not root).
    public struct Summary: Sendable, Equatable {
        /// Tar entries processed, including whiteouts.
        public var entries = 0
        /// Content bytes written to regular files.
        public var bytesWritten: Int64 = 0
        /// Whiteout and opaque markers applied.
        public var whiteouts = 0
        /// Character and block devices not created because we lack privileges.
        public var skippedDevices = 0
        /// Number of warnings (including skipped devices).
        public var warnings = 0
        /// The first warnings in full, so logs stay bounded on huge layers.
        public var warningMessages: [String] = []

        public init() {}
    }

    public let mode: Mode
    /// Whether to create devices and whiteouts and apply ownership. Defaults to
    /// "running as root"; tests override it to exercise the unprivileged path.
    var privileged: Bool

    public init(mode: Mode) {
        self.mode = mode
        self.privileged = geteuid() == 0
    }

    init(mode: Mode, privileged: Bool) {
        self.mode = mode
        self.privileged = privileged
    }

    /// Unpacks the layer file at `layerPath` (plain, gzip or zstd tar — detected
    /// from its content) into `directory`, which must exist. On error the
    /// directory is left partly written; callers should discard it.
    public func unpack(layer layerPath: String, into directory: String) throws -> Summary {
        let reader = TarReader(try Decompressor(path: layerPath))
        return try unpack(reader, into: directory)
    }

    /// Unpacks from an already-open tar stream (e.g. one fed from a download pipe).
    public func unpack(_ reader: TarReader, into directory: String) throws -> Summary {
        let rootFD = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard rootFD >= 0 else { throw LayerError.system(path: directory, operation: "open target directory", errno: errno) }
        defer { close(rootFD) }
        let session = UnpackSession(rootFD: rootFD, mode: mode, privileged: privileged)
        while let entry = try reader.next() {
            session.summary.entries += 1
            try session.handle(entry, reader)
        }
        session.finishDirectories()
        return session.summary
    }
}

/// The mutable state of one `unpack` call. Not shared between threads.
private final class UnpackSession {
    let rootFD: Int32
    let mode: LayerUnpacker.Mode
    let privileged: Bool
    var summary = LayerUnpacker.Summary()
    /// Apply mode: every path this layer created, plus their ancestors, so that
    /// whiteouts spare them (whiteouts only hide lower layers).
    var touched = Set<[UInt8]>()
    /// Directory modes and mtimes are set last, so that writing their contents
    /// neither bumps the mtime nor is blocked by a read-only mode.
    var deferredDirectories: [[UInt8]: DeferredDirectory] = [:]
    let copyBuffer: UnsafeMutableRawBufferPointer

    struct DeferredDirectory {
        var components: [[UInt8]]
        var mode: UInt32
        var times: (Int64, Int32)
    }

    static let maxPathLength = 4096
    static let maxWarningMessages = 50
    static let slash = UInt8(ascii: "/")
    static let aufsMetaPrefix = Array(".wh..wh.".utf8)

    init(rootFD: Int32, mode: LayerUnpacker.Mode, privileged: Bool) {
        self.rootFD = rootFD
        self.mode = mode
        self.privileged = privileged
        self.copyBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 128 * 1024, alignment: 16)
    }

    deinit { copyBuffer.deallocate() }

    // MARK: - Dispatch

    func handle(_ entry: TarEntry, _ reader: TarReader) throws {
        let display = entry.path
        let components = try safeComponents(entry.pathBytes, display: display, what: "path")
        guard let name = components.last else {
            // "./": the layer root itself.
            guard entry.kind == .directory else {
                throw LayerError.unsafeEntry(path: display, reason: "entry would replace the layer root with a non-directory")
            }
            let fd = dup(rootFD)
            guard fd >= 0 else { throw LayerError.system(path: display, operation: "open", errno: errno) }
            defer { close(fd) }
            try applyOwnershipAndXattrs(fd: fd, entry, display: display)
            deferredDirectories[[]] = DeferredDirectory(components: [], mode: entry.mode,
                                                        times: (entry.modificationTime, entry.modificationNanoseconds))
            return
        }
        let parents = Array(components.dropLast())

        if parents.contains(where: { $0.starts(with: Self.aufsMetaPrefix) }) {
            // Inside AUFS bookkeeping directories such as .wh..wh.plnk: not image content.
            warn("ignored AUFS metadata entry \(quoted(display))")
            return
        }
        if name.starts(with: Array(".wh.".utf8)) {
            if name == Array(".wh..wh..opq".utf8) {
                try opaque(parents, display: display)
                summary.whiteouts += 1
            } else if name.starts(with: Self.aufsMetaPrefix) {
                warn("ignored AUFS metadata entry \(quoted(display))")
            } else {
                let target = Array(name.dropFirst(4))
                guard !target.isEmpty, target != [UInt8(ascii: ".")], target != Array("..".utf8) else {
                    throw LayerError.unsafeEntry(path: display, reason: "whiteout does not name a file")
                }
                try whiteout(parents, target, display: display)
                summary.whiteouts += 1
            }
            return
        }

        switch entry.kind {
        case .regular: try createFile(entry, parents, name, display, reader)
        case .directory: try createDirectory(entry, components, display)
        case .symlink: try createSymlink(entry, parents, name, display)
        case .hardlink: try createHardlink(entry, components, display)
        case .characterDevice, .blockDevice, .fifo: try createNode(entry, parents, name, display)
        }
    }

    // MARK: - Entry kinds

    private func createFile(_ entry: TarEntry, _ parents: [[UInt8]], _ name: [UInt8], _ display: String,
                            _ reader: TarReader) throws {
        let parentFD = try openParent(parents, display: display)
        defer { close(parentFD) }
        _ = try clearSlot(parentFD, name, keepDirectory: false, path: parents + [name], display: display)
        let fd = cString(name) { openat(parentFD, $0, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600) }
        guard fd >= 0 else { throw LayerError.system(path: display, operation: "create file", errno: errno) }
        var closed = false
        defer { if !closed { close(fd) } }
        markTouched(parents + [name])
        while true {
            let n = try reader.read(into: copyBuffer)
            if n == 0 { break }
            var offset = 0
            while offset < n {
                let w = write(fd, copyBuffer.baseAddress! + offset, n - offset)
                if w < 0 {
                    if errno == EINTR { continue }
                    throw LayerError.system(path: display, operation: "write", errno: errno)
                }
                offset += w
            }
            summary.bytesWritten += Int64(n)
        }
        try applyOwnershipAndXattrs(fd: fd, entry, display: display)
        guard fchmod(fd, mode_t(entry.mode)) == 0 else {
            throw LayerError.system(path: display, operation: "set mode of", errno: errno)
        }
        var times = Self.timespecs(entry.modificationTime, entry.modificationNanoseconds)
        guard futimens(fd, &times) == 0 else {
            throw LayerError.system(path: display, operation: "set times of", errno: errno)
        }
        closed = true
        guard close(fd) == 0 else { throw LayerError.system(path: display, operation: "close", errno: errno) }
    }

    private func createDirectory(_ entry: TarEntry, _ components: [[UInt8]], _ display: String) throws {
        let parents = Array(components.dropLast())
        let name = components.last!
        let parentFD = try openParent(parents, display: display)
        defer { close(parentFD) }
        let slot = try clearSlot(parentFD, name, keepDirectory: true, path: components, display: display)
        if slot != .keptDirectory {
            // Owner-writable until the deferred chmod, so contents can be added.
            guard cString(name, { mkdirat(parentFD, $0, 0o700) }) == 0 else {
                throw LayerError.system(path: display, operation: "create directory", errno: errno)
            }
        }
        markTouched(components)
        let fd = cString(name) { openat(parentFD, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        guard fd >= 0 else { throw LayerError.system(path: display, operation: "open directory", errno: errno) }
        defer { close(fd) }
        try applyOwnershipAndXattrs(fd: fd, entry, display: display)
        if slot == .replacedWhiteout {
            // Same-layer whiteout then directory: the directory must still hide
            // the lower layers' contents, which is what opaque means.
            try setOpaque(fd, display: display)
        }
        deferredDirectories[Self.join(components)] = DeferredDirectory(
            components: components, mode: entry.mode, times: (entry.modificationTime, entry.modificationNanoseconds))
    }

    private func createSymlink(_ entry: TarEntry, _ parents: [[UInt8]], _ name: [UInt8], _ display: String) throws {
        let target = entry.linkTargetBytes
        guard target.count <= Self.maxPathLength else {
            throw LayerError.unsafeEntry(path: display, reason: "symlink target is longer than \(Self.maxPathLength) bytes")
        }
        if target.first != Self.slash {
            // Absolute targets are resolved inside the container's root at run
            // time; relative ones must not climb above the layer root from here.
            var depth = parents.count
            for component in target.split(separator: Self.slash, omittingEmptySubsequences: true) {
                if component.elementsEqual(".".utf8) { continue }
                if component.elementsEqual("..".utf8) {
                    depth -= 1
                    if depth < 0 {
                        throw LayerError.unsafeEntry(path: display,
                            reason: "symlink target \(quoted(entry.linkTarget)) climbs out of the layer root")
                    }
                } else {
                    depth += 1
                }
            }
        }
        let parentFD = try openParent(parents, display: display)
        defer { close(parentFD) }
        _ = try clearSlot(parentFD, name, keepDirectory: false, path: parents + [name], display: display)
        let rc = cString(target) { t in cString(name) { n in symlinkat(t, parentFD, n) } }
        guard rc == 0 else { throw LayerError.system(path: display, operation: "create symlink", errno: errno) }
        markTouched(parents + [name])
        try finishNode(entry, parentFD: parentFD, name: name, display: display, chmod: false)
    }

    private func createHardlink(_ entry: TarEntry, _ components: [[UInt8]], _ display: String) throws {
        let targetComponents = try safeComponents(entry.linkTargetBytes, display: display,
                                                  what: "hardlink target \(quoted(entry.linkTarget))")
        guard let targetName = targetComponents.last else {
            throw LayerError.unsafeEntry(path: display, reason: "hardlink target is the layer root")
        }
        if targetComponents == components { return } // a link to itself: nothing to do
        let missing = mode == .overlay
            ? "hardlink target \(quoted(entry.linkTarget)) is not in this layer (an overlay layer cannot link to a lower layer's file)"
            : "hardlink target \(quoted(entry.linkTarget)) does not exist"
        guard let targetParentFD = try openDirectory(Array(targetComponents.dropLast()), create: false,
                                                     display: display, role: "hardlink target") else {
            throw LayerError.unsafeEntry(path: display, reason: missing)
        }
        defer { close(targetParentFD) }
        var st = stat()
        let src = cString(targetName) { fstatat(targetParentFD, $0, &st, AT_SYMLINK_NOFOLLOW) }
        if src != 0 {
            if errno == ENOENT { throw LayerError.unsafeEntry(path: display, reason: missing) }
            throw LayerError.system(path: display, operation: "inspect hardlink target of", errno: errno)
        }
        if st.st_mode & S_IFMT == S_IFDIR {
            throw LayerError.unsafeEntry(path: display, reason: "hardlink target \(quoted(entry.linkTarget)) is a directory")
        }
        let parents = Array(components.dropLast())
        let name = components.last!
        let parentFD = try openParent(parents, display: display)
        defer { close(parentFD) }
        _ = try clearSlot(parentFD, name, keepDirectory: false, path: components, display: display)
        // Flags 0: if the target is itself a symlink, link the symlink, never what it points to.
        let rc = cString(targetName) { t in cString(name) { n in linkat(targetParentFD, t, parentFD, n, 0) } }
        guard rc == 0 else {
            if errno == ENOENT { throw LayerError.unsafeEntry(path: display, reason: missing) }
            throw LayerError.system(path: display, operation: "create hardlink", errno: errno)
        }
        markTouched(components)
    }

    private func createNode(_ entry: TarEntry, _ parents: [[UInt8]], _ name: [UInt8], _ display: String) throws {
        let type: mode_t
        switch entry.kind {
        case .characterDevice: type = S_IFCHR
        case .blockDevice: type = S_IFBLK
        default: type = S_IFIFO
        }
        // FIFOs need no privilege; devices do.
        if type != S_IFIFO && !privileged {
            skipDevice(display, reason: "not running as root")
            return
        }
        let parentFD = try openParent(parents, display: display)
        defer { close(parentFD) }
        _ = try clearSlot(parentFD, name, keepDirectory: false, path: parents + [name], display: display)
        let dev = type == S_IFIFO ? 0 : flotilla_makedev(entry.deviceMajor, entry.deviceMinor)
        let rc = cString(name) { mknodat(parentFD, $0, type | 0o600, dev) }
        if rc != 0 {
            if errno == EPERM && type != S_IFIFO {
                skipDevice(display, reason: "not permitted (user namespace?)")
                return
            }
            throw LayerError.system(path: display, operation: "create device node", errno: errno)
        }
        markTouched(parents + [name])
        try finishNode(entry, parentFD: parentFD, name: name, display: display, chmod: true)
    }

    private func skipDevice(_ display: String, reason: String) {
        summary.skippedDevices += 1
        warn("skipped device node \(quoted(display)): \(reason)")
    }

    /// Ownership, xattrs, mode and times for entries that cannot be opened as
    /// files (symlinks, devices, fifos): addressed by parent fd and name, no-follow.
    private func finishNode(_ entry: TarEntry, parentFD: Int32, name: [UInt8], display: String, chmod: Bool) throws {
        if privileged {
            let rc = cString(name) { fchownat(parentFD, $0, entry.uid, entry.gid, AT_SYMLINK_NOFOLLOW) }
            guard rc == 0 else { throw LayerError.system(path: display, operation: "change owner of", errno: errno) }
        }
        if !entry.xattrs.isEmpty {
            // No "lsetxattrat" exists; /proc/self/fd/N pins the parent we already
            // opened safely, and lsetxattr does not follow the final component.
            let path = Array("/proc/self/fd/\(parentFD)/".utf8) + name
            try setXattrs(entry, display: display) { key, value, count in
                cString(path) { flotilla_lsetxattr($0, key, value, count) }
            }
        }
        if chmod {
            // The node was just created by us and is not a symlink, so following is moot.
            let rc = cString(name) { fchmodat(parentFD, $0, mode_t(entry.mode), 0) }
            guard rc == 0 else { throw LayerError.system(path: display, operation: "set mode of", errno: errno) }
        }
        var times = Self.timespecs(entry.modificationTime, entry.modificationNanoseconds)
        let rc = cString(name) { utimensat(parentFD, $0, &times, AT_SYMLINK_NOFOLLOW) }
        guard rc == 0 else { throw LayerError.system(path: display, operation: "set times of", errno: errno) }
    }

    // MARK: - Whiteouts

    private func whiteout(_ parents: [[UInt8]], _ target: [UInt8], display: String) throws {
        let path = parents + [target]
        switch mode {
        case .apply:
            guard let parentFD = try openDirectory(parents, create: false, display: display, role: "whiteout") else {
                return // nothing below to hide
            }
            defer { close(parentFD) }
            try removeEntry(parentFD, target, path: path, sparing: true, display: display)
        case .overlay:
            guard privileged else {
                throw LayerError.unsupported(path: display,
                    reason: "overlay whiteouts are 0/0 character devices, which need root (use apply mode instead)")
            }
            let parentFD = try openParent(parents, display: display)
            defer { close(parentFD) }
            var st = stat()
            if cString(target, { fstatat(parentFD, $0, &st, AT_SYMLINK_NOFOLLOW) }) == 0 {
                // The same layer already has this path; whiteouts only hide lower
                // layers, so keep it. A directory must still hide lower contents.
                if st.st_mode & S_IFMT == S_IFDIR {
                    let fd = cString(target) { openat(parentFD, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
                    guard fd >= 0 else { throw LayerError.system(path: display, operation: "open directory", errno: errno) }
                    defer { close(fd) }
                    try setOpaque(fd, display: display)
                }
                return
            }
            let rc = cString(target) { mknodat(parentFD, $0, S_IFCHR | 0o600, flotilla_makedev(0, 0)) }
            guard rc == 0 else { throw LayerError.system(path: display, operation: "create whiteout device for", errno: errno) }
        }
    }

    private func opaque(_ parents: [[UInt8]], display: String) throws {
        switch mode {
        case .apply:
            guard let dirFD = try openDirectory(parents, create: false, display: display, role: "opaque marker") else {
                return
            }
            defer { close(dirFD) }
            for child in try listDirectory(dirFD, display: display) {
                try removeEntry(dirFD, child, path: parents + [child], sparing: true, display: display)
            }
        case .overlay:
            let dirFD = try openParent(parents, display: display)
            defer { close(dirFD) }
            try setOpaque(dirFD, display: display)
        }
    }

    private func setOpaque(_ fd: Int32, display: String) throws {
        let rc = flotilla_fsetxattr(fd, "trusted.overlay.opaque", "y", 1)
        guard rc == 0 else {
            if errno == EPERM {
                throw LayerError.unsupported(path: display,
                    reason: "setting trusted.overlay.opaque needs root (use apply mode instead)")
            }
            throw LayerError.system(path: display, operation: "set trusted.overlay.opaque on", errno: errno)
        }
    }

    // MARK: - Removal

    private enum Slot { case empty, keptDirectory, replacedWhiteout }

    /// Makes room for a new entry named `name`: an existing non-directory is
    /// unlinked (never followed), an existing directory is kept when the new
    /// entry is a directory too, and removed recursively otherwise.
    private func clearSlot(_ parentFD: Int32, _ name: [UInt8], keepDirectory: Bool, path: [[UInt8]],
                           display: String) throws -> Slot {
        var st = stat()
        if cString(name, { fstatat(parentFD, $0, &st, AT_SYMLINK_NOFOLLOW) }) != 0 {
            if errno == ENOENT { return .empty }
            throw LayerError.system(path: display, operation: "inspect", errno: errno)
        }
        if st.st_mode & S_IFMT == S_IFDIR {
            if keepDirectory { return .keptDirectory }
            try removeEntry(parentFD, name, path: path, sparing: false, display: display)
            return .empty
        }
        let wasWhiteout = mode == .overlay && st.st_mode & S_IFMT == S_IFCHR && st.st_rdev == 0
        guard cString(name, { unlinkat(parentFD, $0, 0) }) == 0 || errno == ENOENT else {
            throw LayerError.system(path: display, operation: "replace", errno: errno)
        }
        return wasWhiteout ? .replacedWhiteout : .empty
    }

    /// Removes `name` from `parentFD`, recursively and without following
    /// symlinks. With `sparing`, paths this layer wrote survive: whiteouts and
    /// opaque markers hide lower layers only (OCI image spec).
    private func removeEntry(_ parentFD: Int32, _ name: [UInt8], path: [[UInt8]], sparing: Bool,
                             display: String) throws {
        let spare = sparing && touched.contains(Self.join(path))
        var st = stat()
        if cString(name, { fstatat(parentFD, $0, &st, AT_SYMLINK_NOFOLLOW) }) != 0 {
            if errno == ENOENT { return }
            throw LayerError.system(path: display, operation: "inspect", errno: errno)
        }
        if st.st_mode & S_IFMT != S_IFDIR {
            if spare { return }
            guard cString(name, { unlinkat(parentFD, $0, 0) }) == 0 || errno == ENOENT else {
                throw LayerError.system(path: display, operation: "remove \(quoted(Self.display(path))) for", errno: errno)
            }
            return
        }

        // Iterative depth-first removal: deep trees cost heap, not stack.
        struct Frame {
            let fd: Int32
            let name: [UInt8]
            let path: [[UInt8]]
            var children: [[UInt8]]
            var index = 0
            var keep: Bool
        }
        var stack: [Frame] = []
        defer { for frame in stack { close(frame.fd) } }

        func push(_ parent: Int32, _ name: [UInt8], _ path: [[UInt8]], keep: Bool) throws {
            let fd = cString(name) { openat(parent, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
            guard fd >= 0 else {
                throw LayerError.system(path: display, operation: "open \(quoted(Self.display(path))) for removal by", errno: errno)
            }
            let children: [[UInt8]]
            do { children = try listDirectory(fd, display: display) } catch { close(fd); throw error }
            stack.append(Frame(fd: fd, name: name, path: path, children: children, keep: keep))
        }

        try push(parentFD, name, path, keep: spare)
        while !stack.isEmpty {
            let top = stack.count - 1
            if stack[top].index == stack[top].children.count {
                let frame = stack.removeLast()
                close(frame.fd)
                let parent = stack.last?.fd ?? parentFD
                if frame.keep {
                    if !stack.isEmpty { stack[stack.count - 1].keep = true }
                } else {
                    guard cString(frame.name, { unlinkat(parent, $0, AT_REMOVEDIR) }) == 0 || errno == ENOENT else {
                        throw LayerError.system(path: display, operation: "remove \(quoted(Self.display(frame.path))) for", errno: errno)
                    }
                }
                continue
            }
            let child = stack[top].children[stack[top].index]
            stack[top].index += 1
            let dirFD = stack[top].fd
            let childPath = stack[top].path + [child]
            let spareChild = sparing && touched.contains(Self.join(childPath))
            var cst = stat()
            if cString(child, { fstatat(dirFD, $0, &cst, AT_SYMLINK_NOFOLLOW) }) != 0 {
                if errno == ENOENT { continue }
                throw LayerError.system(path: display, operation: "inspect \(quoted(Self.display(childPath))) for", errno: errno)
            }
            if cst.st_mode & S_IFMT == S_IFDIR {
                try push(dirFD, child, childPath, keep: spareChild)
            } else if spareChild {
                stack[top].keep = true
            } else {
                guard cString(child, { unlinkat(dirFD, $0, 0) }) == 0 || errno == ENOENT else {
                    throw LayerError.system(path: display, operation: "remove \(quoted(Self.display(childPath))) for", errno: errno)
                }
            }
        }
    }

    private func listDirectory(_ fd: Int32, display: String) throws -> [[UInt8]] {
        let copy = dup(fd)
        guard copy >= 0 else { throw LayerError.system(path: display, operation: "list directory for", errno: errno) }
        guard let dir = fdopendir(copy) else {
            let e = errno
            close(copy)
            throw LayerError.system(path: display, operation: "list directory for", errno: e)
        }
        defer { closedir(dir) }
        rewinddir(dir)
        var names: [[UInt8]] = []
        while let ent = readdir(dir) {
            let name: [UInt8] = withUnsafeBytes(of: ent.pointee.d_name) { raw in Array(raw.prefix { $0 != 0 }) }
            if name == [UInt8(ascii: ".")] || name == Array("..".utf8) { continue }
            names.append(name)
        }
        return names
    }

    // MARK: - Safe path walking

    /// Splits and validates an entry path. Refuses absolute paths and any `..`.
    private func safeComponents(_ raw: [UInt8], display: String, what: String) throws -> [[UInt8]] {
        guard raw.count <= Self.maxPathLength else {
            throw LayerError.unsafeEntry(path: display, reason: "\(what) is longer than \(Self.maxPathLength) bytes")
        }
        if raw.first == Self.slash {
            throw LayerError.unsafeEntry(path: display, reason: "\(what) is absolute")
        }
        let components = Self.split(raw)
        if components.contains(Array("..".utf8)) {
            var depth = 0
            for c in components {
                depth += c == Array("..".utf8) ? -1 : 1
                if depth < 0 {
                    throw LayerError.unsafeEntry(path: display, reason: "\(what) climbs out of the layer root")
                }
            }
            throw LayerError.unsafeEntry(path: display, reason: "\(what) contains a \"..\" component")
        }
        return components
    }

    private func openParent(_ components: [[UInt8]], display: String) throws -> Int32 {
        // With create: true a directory is always returned.
        try openDirectory(components, create: true, display: display, role: "parent")!
    }

    /// Opens the directory at `components` below the root one component at a
    /// time with `O_NOFOLLOW | O_DIRECTORY`, refusing symlinks and non-directories.
    /// Missing directories are created when `create` is set, else nil is returned.
    private func openDirectory(_ components: [[UInt8]], create: Bool, display: String, role: String) throws -> Int32? {
        var fd = dup(rootFD)
        guard fd >= 0 else { throw LayerError.system(path: display, operation: "open layer root for", errno: errno) }
        for (i, component) in components.enumerated() {
            let flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
            var next = cString(component) { openat(fd, $0, flags) }
            if next < 0 && errno == ENOENT && create {
                if cString(component, { mkdirat(fd, $0, 0o755) }) != 0 && errno != EEXIST {
                    let e = errno
                    close(fd)
                    throw LayerError.system(path: display, operation: "create parent directory for", errno: e)
                }
                markTouched(Array(components[...i]))
                next = cString(component) { openat(fd, $0, flags) }
            }
            if next < 0 {
                let e = errno
                defer { close(fd) }
                if e == ENOENT && !create { return nil }
                let prefix = Self.display(Array(components[...i]))
                if e == ELOOP || e == ENOTDIR {
                    var st = stat()
                    let isLink = cString(component) { fstatat(fd, $0, &st, AT_SYMLINK_NOFOLLOW) } == 0
                        && st.st_mode & S_IFMT == S_IFLNK
                    let reason = isLink
                        ? "\(role) path goes through symlink \(quoted(prefix)); refusing to follow it"
                        : "\(role) path goes through \(quoted(prefix)), which is not a directory"
                    throw LayerError.unsafeEntry(path: display, reason: reason)
                }
                throw LayerError.system(path: display, operation: "open \(quoted(prefix)) for", errno: e)
            }
            close(fd)
            fd = next
        }
        return fd
    }

    private func markTouched(_ components: [[UInt8]]) {
        guard mode == .apply else { return }
        var path: [UInt8] = []
        for c in components {
            if !path.isEmpty { path.append(Self.slash) }
            path += c
            touched.insert(path)
        }
    }

    // MARK: - Metadata

    private func applyOwnershipAndXattrs(fd: Int32, _ entry: TarEntry, display: String) throws {
        if privileged {
            guard fchown(fd, entry.uid, entry.gid) == 0 else {
                throw LayerError.system(path: display, operation: "change owner of", errno: errno)
            }
        }
        // After chown, which would clear security.capability.
        try setXattrs(entry, display: display) { key, value, count in flotilla_fsetxattr(fd, key, value, count) }
    }

    private func setXattrs(_ entry: TarEntry, display: String,
                           _ set: (UnsafePointer<CChar>, UnsafeRawPointer?, Int) -> Int32) throws {
        for (key, value) in entry.xattrs.sorted(by: { $0.key < $1.key }) {
            if key.hasPrefix("trusted.overlay.") || key.hasPrefix("user.overlay.") {
                // These steer overlayfs itself (redirects, metacopy); a layer must not set them.
                warn("ignored overlayfs xattr \(quoted(key)) on \(quoted(display))")
                continue
            }
            let rc = value.withUnsafeBytes { raw in key.withCString { set($0, raw.baseAddress, raw.count) } }
            if rc != 0 {
                let e = errno
                if key.hasPrefix("security.") || e == ENOTSUP || e == EPERM || e == E2BIG || e == ERANGE {
                    warn("could not set xattr \(quoted(key)) on \(quoted(display)): \(errorString(e))")
                    continue
                }
                throw LayerError.system(path: display, operation: "set xattr \(quoted(key)) on", errno: e)
            }
        }
    }

    /// Sets the deferred directory modes and mtimes, deepest first. Directories
    /// that were since removed or replaced (by a symlink, say) are skipped: the
    /// walk still refuses to follow symlinks.
    func finishDirectories() {
        let ordered = deferredDirectories.values.sorted { $0.components.count > $1.components.count }
        for dir in ordered {
            let fd: Int32
            if let name = dir.components.last {
                guard let parent = try? openDirectory(Array(dir.components.dropLast()), create: false,
                                                      display: "", role: "directory") else { continue }
                fd = cString(name) { openat(parent, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
                close(parent)
            } else {
                fd = dup(rootFD)
            }
            guard fd >= 0 else { continue }
            let display = Self.display(dir.components)
            if fchmod(fd, mode_t(dir.mode)) != 0 {
                warn("could not set mode of directory \(quoted(display)): \(errorString(errno))")
            }
            var times = Self.timespecs(dir.times.0, dir.times.1)
            if futimens(fd, &times) != 0 {
                warn("could not set times of directory \(quoted(display)): \(errorString(errno))")
            }
            close(fd)
        }
    }

    private func warn(_ message: String) {
        summary.warnings += 1
        if summary.warningMessages.count < Self.maxWarningMessages {
            summary.warningMessages.append(message)
        }
    }

    // MARK: - Helpers

    private static func timespecs(_ seconds: Int64, _ nanoseconds: Int32) -> [timespec] {
        let t = timespec(tv_sec: Int(truncatingIfNeeded: seconds), tv_nsec: Int(nanoseconds))
        return [t, t] // atime = mtime: tar rarely carries atime and it is not worth trusting
    }

    static func split(_ bytes: [UInt8]) -> [[UInt8]] {
        bytes.split(separator: slash, omittingEmptySubsequences: true)
            .filter { !$0.elementsEqual(".".utf8) }
            .map(Array.init)
    }

    static func join(_ components: [[UInt8]]) -> [UInt8] {
        Array(components.joined(separator: [slash]))
    }

    static func display(_ components: [[UInt8]]) -> String {
        String(decoding: join(components), as: UTF8.self)
    }
}

private func cString<R>(_ bytes: [UInt8], _ body: (UnsafePointer<CChar>) throws -> R) rethrows -> R {
    var terminated = bytes
    terminated.append(0)
    return try terminated.withUnsafeBufferPointer { buffer in
        try buffer.withMemoryRebound(to: CChar.self) { try body($0.baseAddress!) }
    }
}
