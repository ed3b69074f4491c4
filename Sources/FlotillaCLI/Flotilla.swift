public import ArgumentParser

/// `flotilla`: the agent and the commands that talk to it.
public struct Flotilla: AsyncParsableCommand {
    public static let version = "0.1.0"

    public static let configuration = CommandConfiguration(
        commandName: "flotilla",
        abstract: "Run microservices on one machine or many: deploy, keep healthy, discover, route.",
        version: version,
        subcommands: [
            AgentCommand.self, DeployCommand.self, AppsCommand.self, AppCommand.self, ScaleCommand.self,
            RestartCommand.self, RollbackCommand.self, DestroyCommand.self, TasksCommand.self, VersionsCommand.self,
            LogsCommand.self, TopCommand.self, AlertsCommand.self, DeploymentsCommand.self, ServicesCommand.self, NodesCommand.self, KVCommand.self, RoutesCommand.self,
            ImagesCommand.self, ImageCommand.self, SecretsCommand.self, SecretCommand.self, ACLCommand.self, AuditCommand.self,
        ])

    public init() {}
}
