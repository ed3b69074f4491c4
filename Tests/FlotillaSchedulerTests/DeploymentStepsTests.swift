import FlotillaCore
import Testing

@testable import FlotillaScheduler

@Suite struct DeploymentStepsTests {
    func id(_ path: String) -> AppID { try! AppID(path) }

    func deployment(_ steps: [[(Deployment.ActionKind, String)]], at step: Int = 1) -> Deployment {
        Deployment(
            id: "d", version: "v", targets: [], steps: steps.map { $0.map { Deployment.Action(action: $0.0, app: id($0.1)) } }, currentStep: step,
            startedAt: "t")
    }

    @Test func layersFollowTheLongestDependencyChain() {
        // /a needs /b, /b needs /c: c, then b, then a (Marathon's example).
        let layers = DeploymentSteps.layers(
            of: [id("/a"), id("/b"), id("/c")], dependencies: [id("/a"): [id("/b")], id("/b"): [id("/c")], id("/c"): []])
        #expect(layers == [[id("/c")], [id("/b")], [id("/a")]])
        // Independent apps share a layer; an unaffected dependency still counts for depth.
        let partial = DeploymentSteps.layers(of: [id("/a"), id("/x")], dependencies: [id("/a"): [id("/b")], id("/b"): [], id("/x"): []])
        #expect(partial == [[id("/x")], [id("/a")]])
    }

    @Test func cyclesAreFound() {
        #expect(DeploymentSteps.layers(of: [id("/a")], dependencies: [id("/a"): [id("/b")], id("/b"): [id("/a")]]) == nil)
    }

    @Test func appsOfLaterStepsAreHeldBackUntilTheirStep() {
        let plan = deployment([[(.startApplication, "/a"), (.startApplication, "/b")], [(.scaleApplication, "/a")], [(.scaleApplication, "/b")]])
        #expect(DeploymentSteps.heldBack(plan) == [id("/a"), id("/b")])
        var second = plan
        second.currentStep = 2
        #expect(DeploymentSteps.heldBack(second) == [id("/b")])
        second.currentStep = 3
        #expect(DeploymentSteps.heldBack(second).isEmpty)
    }

    @Test func stepsAdvanceWhileTheirActionsAreDone() {
        let plan = deployment([[(.startApplication, "/a")], [(.scaleApplication, "/a")], [(.scaleApplication, "/b")]])
        let progress = DeploymentSteps.advance(plan) { $0.action == .startApplication || $0.app == id("/a") }
        #expect(progress.currentStep == 3)
        #expect(progress.finished == [1, 2])
        // The last step is never passed: the deployment ends when all its apps arrive.
        #expect(DeploymentSteps.advance(plan) { _ in true }.currentStep == 3)
        #expect(DeploymentSteps.advance(plan) { _ in false }.currentStep == 1)
    }
}
