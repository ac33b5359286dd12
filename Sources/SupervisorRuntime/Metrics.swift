import Prometheus
import SupervisorCore

/// Prometheus metrics (docs/PROTOCOL.md 8.3), with the article's names so its alert rules work unchanged:
/// `inference_requests_total{device,status}`, `inference_latency_seconds{device}` (histogram), and the
/// supervisor's own `npu_supervisor_*` gauges and counters. Gauges are refreshed when `/metrics` is scraped.
final class SupervisorMetrics: @unchecked Sendable {  // the registry locks; the caches are loop-confined
    let registry = PrometheusCollectorRegistry()
    private var requestCounters: [String: Counter] = [:]
    private var latencies: [String: DurationHistogram] = [:]
    private var restartCounters: [String: Counter] = [:]
    private var rolloutCounters: [String: Counter] = [:]
    private let queueDepth: Gauge
    private let fallbackActive: Gauge
    private var up: [String: Gauge] = [:]
    private var healthy: [String: Gauge] = [:]

    static let buckets: [Duration] = [
        .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
        .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
        .seconds(30), .seconds(60),
    ]

    init() {
        queueDepth = registry.makeGauge(descriptor: MetricNameDescriptor(
            namespace: "npu_supervisor", metricName: "queue_depth", unitName: "",
            helpText: "Requests waiting for a worker with room."))
        fallbackActive = registry.makeGauge(descriptor: MetricNameDescriptor(
            namespace: "npu_supervisor", metricName: "fallback_active", unitName: "",
            helpText: "1 while CPU fallback workers run because device workers cannot serve."))
    }

    /// One final answer. `device` is the worker that answered ("none" when no worker did).
    func requestFinished(device: String, ok: Bool, latency: Duration) {
        let key = device + (ok ? "|ok" : "|error")
        let counter = requestCounters[key] ?? {
            let c = registry.makeCounter(descriptor: MetricNameDescriptor(
                metricName: "inference_requests", unitName: "total",
                helpText: "Final answers to inference requests, by device and status (ok or error)."),
                labels: [("device", device), ("status", ok ? "ok" : "error")])
            requestCounters[key] = c
            return c
        }()
        counter.increment()
        guard ok else { return }
        let histogram = latencies[device] ?? {
            let h = registry.makeDurationHistogram(descriptor: MetricNameDescriptor(
                metricName: "inference_latency", unitName: "seconds",
                helpText: "Time from accepting a request to its final answer."),
                labels: [("device", device)], buckets: Self.buckets)
            latencies[device] = h
            return h
        }()
        histogram.record(latency)
    }

    /// A rollout ended: `complete`, `rolled_back` or `paused`.
    func rolloutEnded(result: String) {
        let counter = rolloutCounters[result] ?? {
            let c = registry.makeCounter(descriptor: MetricNameDescriptor(
                namespace: "npu_supervisor", metricName: "rollouts", unitName: "total",
                helpText: "Rolling restarts and upgrades by how they ended (complete, rolled_back, paused)."),
                labels: [("result", result)])
            rolloutCounters[result] = c
            return c
        }()
        counter.increment()
    }

    func workerExited(device: String, reason: String) {
        let key = device + "|" + reason
        let counter = restartCounters[key] ?? {
            let c = registry.makeCounter(descriptor: MetricNameDescriptor(
                namespace: "npu_supervisor", metricName: "worker_restarts", unitName: "total",
                helpText: "Worker exits by reason (exited, signaled, oom_killed, hang, ...)."),
                labels: [("device", device), ("reason", reason)])
            restartCounters[key] = c
            return c
        }()
        counter.increment()
    }

    private func deviceGauge(_ cache: inout [String: Gauge], _ name: String, _ help: String, _ device: String) -> Gauge {
        if let gauge = cache[device] { return gauge }
        let gauge = registry.makeGauge(descriptor: MetricNameDescriptor(
            namespace: "npu_supervisor", metricName: name, unitName: "", helpText: help), labels: [("device", device)])
        cache[device] = gauge
        return gauge
    }

    /// Refreshes the gauges from the supervisor's state (on the event loop) and renders the exposition.
    func render(workers: [(device: String, up: Bool, healthy: Bool)], queueDepth depth: Int, fallback: Bool) -> [UInt8] {
        for w in workers {
            deviceGauge(&up, "worker_up", "1 when the device's worker is ready and in rotation.", w.device)
                .set(w.up ? 1.0 : 0.0)
            deviceGauge(&healthy, "device_healthy", "1 when the device passes its device probe (or has none).", w.device)
                .set(w.healthy ? 1.0 : 0.0)
        }
        queueDepth.set(Double(depth))
        fallbackActive.set(fallback ? 1.0 : 0.0)
        var out: [UInt8] = []
        registry.emit(into: &out)
        return out
    }
}
