import FlotillaCore
import Foundation
import Testing

@Suite struct AppDefinitionTests {
    func decode(_ json: String) throws -> AppDefinition {
        let value = try JSONValue.parse(Data(json.utf8))
        guard case .object(let object) = value else { throw FlotillaError.malformed("not an object") }
        return try AppDefinition.decode(object)
    }

    func details(of json: String) -> [FieldError] {
        do {
            _ = try decode(json)
            return []
        } catch let error as FlotillaError {
            if case .invalid(_, let details) = error { return details }
            return [FieldError("?", error.message)]
        } catch {
            return [FieldError("?", "\(error)")]
        }
    }

    @Test func appliesMarathonDefaults() throws {
        let app = try decode(#"{"id": "/web", "cmd": "serve"}"#)
        #expect(app.instances == 1)
        #expect(app.cpus == 1)
        #expect(app.mem == 128)
        #expect(app.backoffSeconds == 1)
        #expect(app.backoffFactor == 1.15)
        #expect(app.maxLaunchDelaySeconds == 300)
        #expect(app.upgradeStrategy == UpgradeStrategy(minimumHealthCapacity: 1, maximumOverCapacity: 1))
        #expect(app.killSelection == .youngestFirst)
        #expect(app.killGracePeriod == 3)
    }

    @Test func legacyPortsBecomePortDefinitions() throws {
        let app = try decode(#"{"id": "/web", "cmd": "serve", "ports": [0, 8080]}"#)
        #expect(app.portDefinitions.map(\.port) == [0, 8080])
    }

    @Test func readsConstraintsAndHealthChecksAndChecksSecretReferences() throws {
        let app = try decode(
            #"""
            {"id": "/web", "cmd": "serve", "constraints": [["hostname", "UNIQUE"], ["rack", "LIKE", "r[12]"]],
             "portDefinitions": [{"port": 0}],
             "healthChecks": [{"protocol": "http", "path": "/health", "intervalSeconds": 5, "timeoutSeconds": 2}],
             "killSelection": "Oldest_First", "env": {"A": "1"}}
            """#)
        #expect(app.constraints == [Constraint(field: "hostname", op: .unique), Constraint(field: "rack", op: .like, value: "r[12]")])
        #expect(app.healthChecks.first?.path == "/health")
        #expect(app.healthChecks.first?.gracePeriodSeconds == 300)
        #expect(app.killSelection == .oldestFirst, "enum values in any case, as Marathon reads them")
        // A reference must name a declared secret, whose source is a path (`path` or `path@key`).
        #expect(details(of: #"{"id": "/web", "cmd": "serve", "env": {"DB": {"secret": "db"}}}"#).map(\.path) == ["/env/DB"])
        #expect(details(of: #"{"id": "/web", "cmd": "serve", "secrets": {"db": {"source": "a//b"}}}"#).map(\.path) == ["/secrets/db/source"])
        #expect(details(of: #"{"id": "/web", "cmd": "serve", "secrets": {"db": {"source": "shop/db@"}}}"#).map(\.path) == ["/secrets/db/source"])
        let withSecrets = try decode(#"{"id": "/web", "cmd": "serve", "env": {"DB": {"secret": "db"}}, "secrets": {"db": {"source": "shop/db@password"}}}"#)
        #expect(withSecrets.secrets["db"]?.path?.path == "shop/db" && withSecrets.secrets["db"]?.path?.key == "password")
        #expect(SecretSource.names(usedBy: withSecrets) == ["db"])
        #expect(SecretSource(source: "/shop/db/").path?.path == "shop/db" && SecretSource(source: "shop/db").path?.key == nil)
    }

    @Test func refusesWhatMarathonRefuses() {
        #expect(details(of: #"{"id": "/web", "cmd": "serve", "cpus": 0}"#).map(\.path) == ["/cpus"])
        #expect(details(of: #"{"id": "/web/restart", "cmd": "serve"}"#).map(\.path) == ["/id"])
        #expect(details(of: #"{"id": "/web", "cmd": "serve", "constraints": [["hostname", "UNIQUE", "x"]]}"#).map(\.path) == ["/constraints(0)"])
        #expect(!details(of: #"{"id": "/web", "cmd": "run", "labels": {"MARATHON_SINGLE_INSTANCE_APP": "true"}, "instances": 2}"#).isEmpty)
        #expect(details(of: #"{"id": "/web", "cmd": "serve", "tty": true}"#).map(\.path) == ["/tty"])
        #expect(details(of: #"{"id": "/web", "cmd": "serve", "role": "slave_public"}"#).map(\.path) == ["/role"])
        #expect(details(of: #"{"id": "/web", "cmd": "serve", "unreachableStrategy": {"inactiveAfterSeconds": 600, "expungeAfterSeconds": 60}}"#)
            .map(\.path) == ["/unreachableStrategy/inactiveAfterSeconds"])
        #expect(details(of: #"{"id": "/web", "cmd": "serve", "resourceLimits": {"cpus": "unlimited", "mem": 256}, "unreachableStrategy": "disabled"}"#).isEmpty)
    }

    @Test func namesEveryInvalidField() {
        let problems = details(of: #"{"id": "/web", "cmd": "run", "instances": -1, "cpus": -2, "backoffFactor": 0.5}"#)
        #expect(Set(problems.map(\.path)) == ["/instances", "/cpus", "/backoffFactor"])
    }

    @Test func typeErrorsCarryTheirPath() {
        #expect(details(of: #"{"id": "/web", "cmd": "run", "instances": "three"}"#).map(\.path) == ["/instances"])
        #expect(details(of: #"{"id": "/web", "cmd": "run", "portDefinitions": [{"port": "x"}]}"#).first?.path == "/portDefinitions(0)/port")
    }

    @Test func rejectsUnknownFieldsAndBadConstraints() {
        #expect(details(of: #"{"id": "/web", "cmd": "run", "instanz": 2}"#).map(\.path) == ["/instanz"])
        #expect(!details(of: #"{"id": "/web", "cmd": "run", "constraints": [["hostname", "SOMETIMES"]]}"#).isEmpty)
        #expect(!details(of: #"{"id": "/web", "cmd": "run", "constraints": [["rack", "LIKE", "("]]}"#).isEmpty)
        #expect(!details(of: #"{"id": "/web", "cmd": "run", "constraints": [["rack", "MAX_PER", "zero"]]}"#).isEmpty)
    }

    @Test func needsACommandAndAValidStrategy() {
        #expect(details(of: #"{"id": "/web"}"#).map(\.path) == ["/"])
        #expect(
            details(of: #"{"id": "/web", "cmd": "run", "upgradeStrategy": {"minimumHealthCapacity": 1, "maximumOverCapacity": 0}}"#)
                .map(\.path) == ["/upgradeStrategy"])
        #expect(!details(of: #"{"id": "/web", "cmd": "run", "container": {"type": "DOCKER"}}"#).isEmpty)
    }

    @Test func healthChecksNeedAPortToCheck() {
        #expect(
            details(of: #"{"id": "/web", "cmd": "run", "portDefinitions": [], "healthChecks": [{"protocol": "HTTP"}]}"#).first?.path
                == "/healthChecks(0)/portIndex")
        // An app that names no ports has Marathon's default one, so port index 0 is there.
        #expect(details(of: #"{"id": "/web", "cmd": "run", "healthChecks": [{"protocol": "HTTP"}]}"#).isEmpty)
        #expect(details(of: #"{"id": "/web", "cmd": "run", "healthChecks": [{"protocol": "COMMAND", "command": {"value": "true"}}]}"#).isEmpty)
    }

    @Test func appsWithoutPortsGetMarathonsDefaultPort() throws {
        #expect(try decode(#"{"id": "/web", "cmd": "serve"}"#).portDefinitions == [PortDefinition(port: 0, name: "default")])
        #expect(try decode(#"{"id": "/web", "cmd": "serve", "portDefinitions": []}"#).portDefinitions.isEmpty)
        #expect(try decode(#"{"id": "/web", "cmd": "serve", "ports": []}"#).portDefinitions.isEmpty)
    }

    @Test func healthCheckTimeoutMayExceedTheIntervalButAProbeNeverOutlivesIt() throws {
        let app = try decode(#"{"id": "/web", "cmd": "run", "healthChecks": [{"intervalSeconds": 10, "timeoutSeconds": 20}]}"#)
        #expect(app.healthChecks[0].timeoutSeconds == 20)
        #expect(app.healthChecks[0].effectiveTimeoutSeconds == 10)
    }

    @Test func scalingIsNotAConfigChange() throws {
        let app = try decode(#"{"id": "/web", "cmd": "serve"}"#)
        var scaled = app
        scaled.instances = 5
        #expect(!scaled.requiresRestart(comparedTo: app))
        var changed = app
        changed.cmd = "serve --fast"
        #expect(changed.requiresRestart(comparedTo: app))
    }

    @Test func roundTripsThroughJSON() throws {
        let app = try decode(#"{"id": "/web", "args": ["serve", "-p", "1"], "labels": {"a": "b"}, "taskKillGracePeriodSeconds": 7}"#)
        let again = try JSONDecoder().decode(AppDefinition.self, from: JSONEncoder().encode(app))
        #expect(again == app)
    }
}

@Suite struct GroupUpdateTests {
    func parse(_ text: String, base: GroupID = .root) throws -> GroupUpdate {
        guard case .object(let object) = try JSONValue.parse(Data(text.utf8)) else { throw FlotillaError.malformed("not an object") }
        return try GroupUpdate.parse(object, base: base)
    }

    @Test func relativeIdsResolveAgainstTheirGroup() throws {
        let update = try parse(#"{"id": "shop", "apps": [{"id": "web", "cmd": "run", "dependencies": ["db", "/other"]}], "groups": [{"id": "back", "apps": [{"id": "db", "cmd": "run"}]}]}"#)
        #expect(update.id.path == "/shop")
        #expect(update.apps?.map(\.id.path) == ["/shop/web"])
        #expect(update.apps?.first?.dependencies == ["/shop/db", "/other"])
        #expect(update.groups?.first?.id.path == "/shop/back")
        #expect(update.groups?.first?.apps?.map(\.id.path) == ["/shop/back/db"])
    }

    @Test func scaleByAndVersionStandAlone() throws {
        #expect(try parse(#"{"scaleBy": 2}"#, base: GroupID("/a")).scaleBy == 2)
        #expect(throws: FlotillaError.self) { try parse(#"{"scaleBy": 2, "id": "/a"}"#) }
        #expect(throws: FlotillaError.self) { try parse(#"{"apps": [{"id": "/elsewhere/x", "cmd": "run"}]}"#, base: GroupID("/a")) }
        #expect(throws: FlotillaError.self) { try parse(#"{"id": "/a", "colour": "blue"}"#) }
    }
}
