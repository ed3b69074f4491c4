import FlotillaCore
import Foundation
import Testing

@Suite struct ContainerSpecTests {
    func decode(_ json: String) throws -> AppDefinition {
        guard case .object(let object) = try JSONValue.parse(Data(json.utf8)) else { throw FlotillaError.malformed("not an object") }
        return try AppDefinition.decode(object)
    }

    func paths(of json: String) -> [String] {
        do {
            _ = try decode(json)
            return []
        } catch let error as FlotillaError {
            if case .invalid(_, let details) = error { return details.map(\.path) }
            return ["?" + error.message]
        } catch {
            return ["?\(error)"]
        }
    }

    @Test func aBridgedContainerTakesItsPortsFromItsMappings() throws {
        let app = try decode(
            #"{"id": "/shop/cart", "networks": [{"mode": "container/bridge"}], "container": {"type": "DOCKER", "docker": {"image": "r:5000/cart:1"},"#
                + #" "portMappings": [{"containerPort": 8080, "hostPort": 0, "name": "http"}, {"containerPort": 9000, "hostPort": 31500, "servicePort": 10500}]}}"#)
        #expect(app.network == .bridge)
        #expect(app.driver == "oci")
        #expect(app.portDefinitions.isEmpty)
        #expect(app.ports.map(\.hostPort) == [0, 31500])
        #expect(app.ports.map(\.containerPort) == [8080, 9000])
        #expect(app.ports.map(\.servicePort) == [0, 10500])
        #expect(app.ports.first?.name == "http")
    }

    @Test func thePre15SpellingsMeanTheSame() throws {
        let legacy = try decode(
            #"{"id": "/web", "container": {"type": "DOCKER", "docker": {"image": "busybox", "network": "BRIDGE","#
                + #" "portMappings": [{"containerPort": 80}]}}, "ports": [0]}"#)
        let current = try decode(
            #"{"id": "/web", "networks": [{"mode": "container/bridge"}], "container": {"type": "DOCKER", "docker": {"image": "busybox"},"#
                + #" "portMappings": [{"containerPort": 80}]}}"#)
        #expect(legacy == current)
        let host = try decode(#"{"id": "/web", "container": {"docker": {"image": "busybox", "network": "HOST"}}, "cmd": "serve"}"#)
        #expect(host.network == .host)
        #expect(host.container?.type == .docker)
    }

    @Test func definitionsRoundTripThroughTheStore() throws {
        let app = try decode(
            #"{"id": "/web", "networks": [{"mode": "container/bridge"}], "container": {"type": "MESOS", "docker": {"image": "busybox", "forcePullImage": true,"#
                + #" "parameters": [{"key": "user", "value": "www"}, {"key": "env", "value": "A=1"}, {"key": "read-only", "value": "true"}]},"#
                + #" "portMappings": [{"containerPort": 80, "protocol": "tcp"}], "volumes": [{"containerPath": "/data", "hostPath": "data", "mode": "RO"}]}}"#)
        let again = try JSONDecoder().decode(AppDefinition.self, from: JSONEncoder().encode(app))
        #expect(again == app)
        #expect(app.container?.user == "www")
        #expect(app.container?.readOnlyRootFilesystem == true)
        #expect(app.container?.parameterEnvironment.map { "\($0.0)=\($0.1)" } == ["A=1"])
        #expect(app.container?.volumes.first?.mode == .readOnly)
    }

    @Test func aMesosContainerWithoutAnImageRunsItsCommandAsExec() throws {
        let app = try decode(#"{"id": "/m", "cmd": "sleep 1000", "container": {"type": "MESOS", "linuxInfo": {"seccomp": {"unconfined": true}}}}"#)
        #expect(app.driver == "exec")
        #expect(app.container?.image == nil)
    }

    @Test func seccompIsOnUnlessTheAppSaysUnconfined() throws {
        #expect(try decode(#"{"id": "/p", "container": {"docker": {"image": "x"}}}"#).container?.seccompUnconfined == false)
        #expect(try decode(#"{"id": "/p", "container": {"docker": {"image": "x"}, "linuxInfo": {"seccomp": {"unconfined": false}}}}"#)
            .container?.seccompUnconfined == false)
        let unconfined = try decode(#"{"id": "/p", "container": {"docker": {"image": "x"}, "linuxInfo": {"seccomp": {"unconfined": true}}}}"#)
        #expect(unconfined.container?.seccompUnconfined == true)
        // Marathon's answer keeps the field, and reading that answer again gives the same app.
        let encoded = try JSONEncoder().encode(unconfined)
        #expect(String(decoding: encoded, as: UTF8.self).contains(#""linuxInfo":{"seccomp":{"unconfined":true}}"#))
        #expect(try JSONDecoder().decode(AppDefinition.self, from: encoded) == unconfined)
        let dockerSpelling = try decode(
            #"{"id": "/p", "container": {"docker": {"image": "x", "parameters": [{"key": "security-opt", "value": "seccomp=unconfined"}]}}}"#)
        #expect(dockerSpelling.container?.seccompUnconfined == true)
        #expect(try decode(#"{"id": "/p", "container": {"docker": {"image": "x", "parameters": [{"key": "security-opt", "value": "no-new-privileges"}]}}}"#)
            .container?.seccompUnconfined == false)
    }

    @Test func udpMappingsAreAccepted() throws {
        let app = try decode(
            #"{"id": "/dns", "networks": [{"mode": "container/bridge"}], "container": {"docker": {"image": "x"}, "portMappings": "#
                + #"[{"containerPort": 53, "protocol": "udp"}, {"containerPort": 54, "protocol": "udp,tcp"}]}}"#)
        #expect(app.ports.map(\.protocol) == ["udp", "udp,tcp"])
        #expect(paths(of: #"{"id": "/p", "networks": [{"mode": "container/bridge"}], "container": {"docker": {"image": "x"}, "portMappings": [{"containerPort": 1, "protocol": "sctp"}]}}"#)
            == ["/container/portMappings(0)/protocol"])
    }

    @Test func whatCannotBeHonouredIsRefusedWithItsPath() {
        #expect(paths(of: #"{"id": "/p", "container": {"docker": {"image": "x", "privileged": true}}}"#) == ["/container/docker/privileged"])
        #expect(paths(of: #"{"id": "/p", "container": {"docker": {"image": "x", "parameters": [{"key": "cap-add", "value": "ALL"}]}}}"#)
            == ["/container/docker/parameters(0)/key"])
        #expect(paths(of: #"{"id": "/p", "container": {"docker": {"image": "x", "pullConfig": {"secret": "s"}}}}"#) == ["/container/docker/pullConfig"])
        #expect(paths(of: #"{"id": "/p", "container": {"docker": {"image": "x", "imgae": "y"}}}"#) == ["/container/docker/imgae"])
        #expect(paths(of: #"{"id": "/p", "container": {"type": "DOCKER"}}"#) == ["/container/docker/image"])
        #expect(paths(of: #"{"id": "/p", "cmd": "x", "networks": [{"mode": "container/bridge"}]}"#) == ["/networks"])
        #expect(paths(of: #"{"id": "/p", "networks": [{"mode": "container", "name": "dcos"}], "container": {"docker": {"image": "x"}}}"#)
            == ["/networks(0)/mode"])
        #expect(paths(of: #"{"id": "/p", "container": {"docker": {"image": "x"}, "portMappings": [{"containerPort": 80}]}}"#)
            == ["/container/portMappings"])
        #expect(paths(of: #"{"id": "/p", "container": {"docker": {"image": "x"}, "linuxInfo": {"seccomp": {"profileName": "p.json"}}}}"#)
            == ["/container/linuxInfo/seccomp"])
        #expect(paths(of: #"{"id": "/p", "container": {"docker": {"image": "x"}, "linuxInfo": {"ipcInfo": {"mode": "SHARE_PARENT"}}}}"#)
            == ["/container/linuxInfo"])
        #expect(paths(of: #"{"id": "/p", "container": {"docker": {"image": "x"}, "linuxInfo": {"seccomp": {"unconfined": "yes"}}}}"#)
            == ["/container/linuxInfo/seccomp/unconfined"])
        #expect(paths(of: #"{"id": "/p", "container": {"docker": {"image": "x", "parameters": [{"key": "security-opt", "value": "apparmor=unconfined"}]}}}"#)
            == ["/container/docker/parameters(0)/value"])
        #expect(paths(of: #"{"id": "/p", "container": {"docker": {"image": "x"}, "volumes": [{"containerPath": "/d", "persistent": {"size": 10}}]}}"#).count == 1)
        #expect(paths(of: #"{"id": "/p", "container": {"docker": {"image": "x"}, "volumes": [{"containerPath": "d", "hostPath": "/x"}]}}"#)
            == ["/container/volumes(0)/containerPath"])
        #expect(paths(of: #"{"id": "/p", "networks": [{"mode": "container/bridge"}], "container": {"docker": {"image": "x"}, "portMappings": [{"containerPort": 1, "hostPort": 5}, {"containerPort": 2, "hostPort": 5}]}}"#)
            == ["/container/portMappings(1)/hostPort"])
    }
}
