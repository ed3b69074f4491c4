public import Foundation
import Synchronization

/// What happened, as the control plane and the API tell it: typed, with no wire format. The API
/// renders each as Marathon's event JSON (`/v2/events`, HTTP callbacks); other readers may render
/// it otherwise.
public enum ControlEvent: Sendable, Hashable {
    /// An app definition was posted or changed through the API.
    case apiPost(definition: AppDefinition, clientIP: String?, uri: String)
    /// A deployment started or moved on. `original`/`target` are the apps before and after
    /// (empty when it only moved to its next step).
    case deploymentInfo(Deployment, original: [AppRecord], target: [AppRecord])
    /// A step (1-based) of a deployment finished, or failed.
    case deploymentStepSuccess(Deployment, step: Int)
    case deploymentStepFailure(Deployment, step: Int)
    case deploymentSuccess(Deployment)
    case deploymentFailed(Deployment, reason: String)
    /// Every instance of a removed app has stopped.
    case appTerminated(AppID)
    /// An instance's state changed (`TASK_RUNNING`, `TASK_KILLED`, …).
    case statusUpdate(InstanceSpec, InstanceStatus)
    /// An instance's condition changed: `Running`, `Standby`, `Killing`, `UnreachableInactive`.
    case instanceChanged(InstanceSpec, condition: String, draining: Bool)
    /// An instance's overall health changed.
    case instanceHealthChanged(InstanceSpec, healthy: Bool?)
    /// One health check's verdict flipped.
    case healthStatusChanged(InstanceSpec, alive: Bool)
    /// One health check counted a failure (the index of the check in the app's definition).
    case failedHealthCheck(InstanceSpec, checkIndex: Int)
    /// An instance was killed for failing its health checks.
    case unhealthyTaskKill(InstanceSpec, reason: String)
    case groupChangeSuccess(GroupID, version: String)
    /// A client attached to or left the event stream.
    case eventStreamAttached(remoteAddress: String)
    case eventStreamDetached(remoteAddress: String)
    /// An HTTP callback was subscribed or unsubscribed.
    case subscriptionChanged(callbackURL: String, clientIP: String, subscribed: Bool)
    /// An alert changed level (`ok`, `warning`, `critical`).
    case alertChanged(AlertStatus, previous: AlertLevel)
    /// Autoscaling changed an app's instances (by the deployment named), and why.
    case autoscaled(app: String, from: Int, to: Int, reason: String, metric: String, value: Double?, target: Double, deploymentID: String)
}

/// An event and when it happened.
public struct PublishedEvent: Sendable, Hashable {
    public var event: ControlEvent
    public var at: Date

    public init(_ event: ControlEvent, at: Date = Date()) {
        self.event = event
        self.at = at
    }
}

/// Fans events out to every subscriber. A slow subscriber loses its oldest events rather than
/// holding up the control loop (the buffer is bounded per subscriber).
public final class EventBus: Sendable {
    private struct State {
        var nextID = 0
        var subscribers: [Int: AsyncStream<PublishedEvent>.Continuation] = [:]
    }

    private let state = Mutex(State())
    private let bufferSize: Int

    public init(bufferSize: Int = 1024) {
        self.bufferSize = bufferSize
    }

    public func publish(_ event: ControlEvent) {
        let published = PublishedEvent(event)
        let subscribers = state.withLock { Array($0.subscribers.values) }
        for subscriber in subscribers {
            subscriber.yield(published)
        }
    }

    /// A stream of every event published from now on; it ends when the consumer stops iterating.
    public func subscribe() -> AsyncStream<PublishedEvent> {
        let (stream, continuation) = AsyncStream.makeStream(
            of: PublishedEvent.self, bufferingPolicy: .bufferingNewest(bufferSize))
        let id = state.withLock { state in
            state.nextID += 1
            state.subscribers[state.nextID] = continuation
            return state.nextID
        }
        continuation.onTermination = { [weak self] _ in
            self?.state.withLock { _ = $0.subscribers.removeValue(forKey: id) }
        }
        return stream
    }

    public func finishAll() {
        let subscribers = state.withLock { state in
            defer { state.subscribers.removeAll() }
            return Array(state.subscribers.values)
        }
        for subscriber in subscribers { subscriber.finish() }
    }

    public var subscriberCount: Int { state.withLock { $0.subscribers.count } }
}
