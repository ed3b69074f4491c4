public import FlotillaCore

/// How a deployment moves through its steps, Marathon's way: the steps run one after the other,
/// a step is finished when every action in it is, and an app whose first action lies in a later
/// step is left as it is until that step comes (that is how `dependencies` order a deployment).
/// Pure: the control plane says which actions are done.
public enum DeploymentSteps {
    /// Apps the deployment holds back: their first action is in a step not reached yet.
    public static func heldBack(_ deployment: Deployment) -> Set<AppID> {
        var held: Set<AppID> = []
        var seen: Set<AppID> = []
        for (index, step) in deployment.steps.enumerated() {
            for action in step where action.action != .startApplication {
                if seen.insert(action.app).inserted && index + 1 > deployment.currentStep { held.insert(action.app) }
            }
        }
        return held
    }

    /// The step the deployment is at once every finished step is passed (1-based; never past the
    /// last), and the steps that finished now.
    public static func advance(_ deployment: Deployment, isDone: (Deployment.Action) -> Bool) -> (currentStep: Int, finished: [Int]) {
        var step = max(1, deployment.currentStep)
        var finished: [Int] = []
        while step < deployment.totalSteps, deployment.steps[step - 1].allSatisfy(isDone) {
            finished.append(step)
            step += 1
        }
        return (step, finished)
    }

    /// Marathon's deployment order for a change of several apps: the apps ordered into layers by
    /// the longest chain of dependencies below each (apps that depend on nothing first). Only
    /// `affected` apps get a layer; `dependencies` maps each app to the apps it needs.
    /// - Returns: nil when the dependencies have a cycle.
    public static func layers(of affected: Set<AppID>, dependencies: [AppID: Set<AppID>]) -> [[AppID]]? {
        var depth: [AppID: Int] = [:]
        var visiting: Set<AppID> = []
        func longest(_ app: AppID) -> Int? {
            if let known = depth[app] { return known }
            guard visiting.insert(app).inserted else { return nil }
            var best = 0
            for dependency in dependencies[app] ?? [] where dependency != app {
                guard let below = longest(dependency) else { return nil }
                best = max(best, below + 1)
            }
            visiting.remove(app)
            depth[app] = best
            return best
        }
        var byDepth: [Int: [AppID]] = [:]
        for app in dependencies.keys.sorted() { if longest(app) == nil { return nil } }
        for app in affected.sorted() {
            guard let level = longest(app) else { return nil }
            byDepth[level, default: []].append(app)
        }
        return byDepth.keys.sorted().map { byDepth[$0]! }
    }
}
