import FlotillaCore
import Foundation

/// The seccomp filter every container gets unless its app asks for none
/// (`linuxInfo.seccomp.unconfined`, or Docker's `security-opt seccomp=unconfined`).
///
/// Docker's default profile allows a list of system calls and refuses the rest. This one is the
/// other way round: it allows everything but the calls that reach past the container — into the
/// kernel's modules, clocks, keyrings, mounts, other namespaces, other processes' memory — so a
/// program that works under Docker works here, and a kernel bug behind one of these calls is out
/// of a container's reach. Most of them need capabilities a container lacks anyway; the filter is
/// the second wall, and the only one for the calls that need none: a new user namespace
/// (`unshare`, `clone` with `CLONE_NEWUSER`), which would hand the container a full set of
/// capabilities inside it, `userfaultfd`, `bpf`, `perf_event_open`, `keyctl` and io_uring.
/// Refused calls fail with EPERM, as under Docker; `clone3` fails with ENOSYS, so the C library
/// falls back to `clone`, whose flags the filter can see.
enum OCISeccomp {
    /// Refused with EPERM.
    static let refusedSystemCalls: [String] = [
        // Kernel modules and the running kernel.
        "create_module", "init_module", "finit_module", "delete_module", "get_kernel_syms", "query_module",
        "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "syslog", "uselib", "nfsservctl",
        "_sysctl", "sysfs", "ustat", "lookup_dcookie", "quotactl",
        // The node's clock.
        "settimeofday", "stime", "clock_settime", "clock_adjtime",
        // Mounts and namespaces.
        "mount", "umount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
        "mount_setattr", "unshare", "setns",
        // Other processes and the kernel's internals.
        "process_vm_readv", "process_vm_writev", "kcmp", "name_to_handle_at", "open_by_handle_at",
        "bpf", "perf_event_open", "userfaultfd", "add_key", "request_key", "keyctl",
        "io_uring_setup", "io_uring_enter", "io_uring_register",
        // Raw hardware access (x86).
        "ioperm", "iopl", "vm86", "vm86old",
    ]

    static let eperm = 1
    static let enosys = 38
    /// `CLONE_NEWUSER`; `clone`'s flags are its first argument on x86 and arm.
    static let cloneNewUser = 0x1000_0000

    /// The architectures whose system calls the filter names: the host's, and the 32-bit ABIs it
    /// runs, so a 32-bit program works and cannot use that ABI to get past the filter.
    static func architectures(machine: String) -> [String] {
        switch machine {
        case "x86_64": return ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
        case "aarch64", "arm64": return ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
        case "ppc64le": return ["SCMP_ARCH_PPC64LE"]
        case "s390x": return ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"]
        case "riscv64": return ["SCMP_ARCH_RISCV64"]
        default: return []
        }
    }

    /// The `linux.seccomp` object of a bundle's config.json.
    static func defaultProfile(machine: String = hostMachine) -> JSONValue {
        // s390's clone takes the flags second.
        let flagsIndex = machine.hasPrefix("s390") ? 1 : 0
        return .object([
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": .array(architectures(machine: machine).map(JSONValue.string)),
            "syscalls": .array([
                .object([
                    "names": .array(refusedSystemCalls.map(JSONValue.string)),
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": .number(Double(eperm)),
                ]),
                .object([
                    "names": ["clone"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": .number(Double(eperm)),
                    "args": .array([
                        .object([
                            "index": .number(Double(flagsIndex)), "value": .number(Double(cloneNewUser)),
                            "valueTwo": .number(Double(cloneNewUser)), "op": "SCMP_CMP_MASKED_EQ",
                        ])
                    ]),
                ]),
                .object(["names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": .number(Double(enosys))]),
            ]),
        ])
    }

    /// `uname -m`.
    static let hostMachine: String = {
        var name = utsname()
        guard uname(&name) == 0 else { return "" }
        return withUnsafeBytes(of: &name.machine) { raw in
            String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
    }()
}
