@testable import FlotillaAgent
import FlotillaCore
import FlotillaImage
import Foundation
import Testing

@Suite struct OCIBundleTests {
    func spec(_ json: String, ports: [Int] = []) throws -> InstanceSpec {
        guard case .object(let object) = try JSONValue.parse(Data(json.utf8)) else { throw FlotillaError.malformed("not an object") }
        let definition = try AppDefinition.decode(object)
        return InstanceSpec(
            id: InstanceSpec.newID(for: definition.id), appID: definition.id, version: "v1", configVersion: "v1", definition: definition,
            node: "n", host: "127.0.0.1", ports: ports, stagedAt: "2026-01-01T00:00:00.000Z")
    }

    func linux(of spec: InstanceSpec) throws -> [String: JSONValue] {
        let bundle = OCIBundle(
            spec: spec, image: ImageConfiguration.ContainerConfig(cmd: ["httpd"]), rootfs: "/r", sandbox: "/s", etcFiles: [:],
            networkNamespace: nil, cgroupsPath: nil, user: (uid: 0, gid: 0, additionalGids: []))
        guard case .object(let config) = try bundle.configuration(), case .object(let linux)? = config["linux"] else {
            throw FlotillaError.malformed("no linux section")
        }
        return linux
    }

    @Test func everyContainerGetsTheDefaultSeccompFilter() throws {
        let linux = try linux(of: spec(#"{"id": "/a", "container": {"docker": {"image": "x"}}}"#))
        guard case .object(let seccomp)? = linux["seccomp"], case .array(let rules)? = seccomp["syscalls"] else {
            Issue.record("no seccomp filter: \(linux)")
            return
        }
        #expect(seccomp["defaultAction"] == "SCMP_ACT_ALLOW")
        let refused = rules.compactMap { rule -> [String]? in
            guard case .object(let fields) = rule, fields["args"] == nil, case .array(let names)? = fields["names"] else { return nil }
            return names.compactMap { if case .string(let name) = $0 { name } else { nil } }
        }.flatMap { $0 }
        for call in ["unshare", "setns", "mount", "bpf", "keyctl", "kexec_load", "init_module", "userfaultfd", "perf_event_open", "clone3"] {
            #expect(refused.contains(call), "\(call) is not refused")
        }
        // clone is refused only with CLONE_NEWUSER among its flags; clone3 with ENOSYS, so libc falls back to clone.
        let clone = rules.first { rule in
            if case .object(let fields) = rule, fields["names"] == ["clone"] { return true } else { return false }
        }
        guard case .object(let cloneRule)? = clone, case .array(let args)? = cloneRule["args"], case .object(let arg)? = args.first else {
            Issue.record("no clone rule")
            return
        }
        #expect(arg["op"] == "SCMP_CMP_MASKED_EQ")
        #expect(arg["value"] == .number(Double(0x1000_0000)) && arg["valueTwo"] == .number(Double(0x1000_0000)))
        let clone3 = rules.first { rule in
            if case .object(let fields) = rule, fields["names"] == ["clone3"] { return true } else { return false }
        }
        if case .object(let fields)? = clone3 { #expect(fields["errnoRet"] == .number(38)) } else { Issue.record("no clone3 rule") }
        if OCISeccomp.hostMachine == "x86_64" {
            #expect(seccomp["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
        }
    }

    @Test func unconfinedContainersGetNoFilter() throws {
        let viaLinuxInfo = try linux(of: spec(#"{"id": "/a", "container": {"docker": {"image": "x"}, "linuxInfo": {"seccomp": {"unconfined": true}}}}"#))
        #expect(viaLinuxInfo["seccomp"] == nil)
        let viaParameter = try linux(of: spec(
            #"{"id": "/a", "container": {"docker": {"image": "x", "parameters": [{"key": "security-opt", "value": "seccomp=unconfined"}]}}}"#))
        #expect(viaParameter["seccomp"] == nil)
    }

    @Test func eachTransportOfAMappingIsPublished() throws {
        let spec = try spec(
            #"{"id": "/dns", "networks": [{"mode": "container/bridge"}], "container": {"docker": {"image": "x"}, "portMappings": ["#
                + #"{"containerPort": 8080}, {"containerPort": 53, "protocol": "udp"}, {"containerPort": 0, "protocol": "udp,tcp"}]}}"#,
            ports: [31001, 31002, 31003])
        #expect(OCIDriver.bridgeMappings(spec) == [
            BridgePortMapping(hostPort: 31001, containerPort: 8080, transport: .tcp),
            BridgePortMapping(hostPort: 31002, containerPort: 53, transport: .udp),
            BridgePortMapping(hostPort: 31003, containerPort: 31003, transport: .tcp),
            BridgePortMapping(hostPort: 31003, containerPort: 31003, transport: .udp),
        ])
    }
}
