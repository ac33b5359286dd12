import SupervisorCore

/// Prints the effective configuration (defaults filled in, paths resolved, `{device}` substituted) as TOML,
/// for `npu-supervisord --check-config`.
public enum ConfigRenderer {
    public static func render(_ c: SupervisorConfiguration) -> String {
        var out = "# effective configuration\n[supervisor]\n"
        out += "run_dir = \(q(c.runDirectory))\n"
        out += "requests_socket = \(q(c.requestsSocket))\nstatus_socket = \(q(c.statusSocket))\n"
        out += "control_socket = \(q(c.controlSocket))\n"
        out += "socket_mode = \"0\(String(c.socketMode, radix: 8))\"\n"
        if let g = c.controlGroup { out += "control_group = \(q(g))\n" }
        out += "max_frame_bytes = \(c.maxFrameBytes)\nshutdown_timeout = \(q(c.shutdownTimeout.configString))\n"
        out += "log_level = \(q(c.logLevel))\noutput_lines = \(c.outputLines)\nmin_ready = \(c.minReady)\n"
        out += "loop_nice = \(c.loopNice)\n"
        if let t = c.readyTimeout { out += "ready_timeout = \(q(t.configString))\n" }
        out += "\n[requests]\nmax_queue = \(c.requests.maxQueue)\n"
        out += "default_deadline = \(q(c.requests.defaultDeadline.configString))\nretries = \(c.requests.retries)\n"
        out += "max_connections = \(c.requests.maxConnections)\n"
        out += "max_inflight_per_connection = \(c.requests.maxInflightPerConnection)\n"
        out += "max_client_buffer = \(c.requests.maxClientBufferBytes)\nburst_affinity = \(c.requests.burstAffinity)\n"
        out += "\n[http]\nlisten = \(q(c.http.listen ?? ""))\n"
        out += "requests = \(c.http.requests)\nmax_body = \(c.http.maxBodyBytes)\n"
        if let file = c.http.tokenFile { out += "token_file = \(q(file))  # the token itself is never printed\n" }
        out += "\n[cgroups]\nmode = \(q(c.cgroups.mode.rawValue))\n"
        if let parent = c.cgroups.parent { out += "parent = \(q(parent))\n" }
        if let f = c.fallback {
            out += "\n# [fallback]: when_fewer_than = \(f.whenFewerThan), stop_after = \(q(f.stopAfter.configString))\n"
        }
        for g in c.groups {
            out += "\n# [[group]] \(g.id): devices \(g.devices.joined(separator: ", ")) in rank order (rank 0, device "
                + "\(g.devices[0]), is the leader), visible_devices = \(q(g.visibleDevices.rawValue)), rank_table = \(g.rankTable);"
                + "\n# each rank is shown below as its own device with its effective keys; NPU_GROUP, RANK, LOCAL_RANK, "
                + "WORLD_SIZE, MASTER_ADDR, MASTER_PORT\(g.rankTable ? ", RANK_TABLE_FILE" : "")" + " are set for each start\n"
        }
        for w in c.workers + (c.fallback?.workers ?? []) {
            let whole = out
            out = ""
            let p = w.policy
            out += "\n[[device]]" + (w.rank.map { "  # rank \($0.rank) of group \($0.group)" } ?? "")
                + "\nid = \(q(w.device))\nkind = \(q(w.kind.rawValue))\n"
            out += "command = [" + w.command.map(q).joined(separator: ", ") + "]\n"
            out += "env = {" + w.environment.sorted { $0.key < $1.key }.map { " \($0.key) = \(q($0.value))" }
                .joined(separator: ",") + " }\n"
            out += "pin_env = \(q(w.pinVariable ?? ""))\n"
            if let wd = w.workingDirectory { out += "working_directory = \(q(wd))\n" }
            out += "max_inflight = \(w.maxInflight)\n"
            out += "heartbeat_interval = \(q(w.heartbeatInterval.configString))\n"
            out += "heartbeat_timeout = \(q(w.heartbeatTimeout.configString))\n"
            out += "restart = \(q(p.restart.rawValue))\n"
            out += "backoff_initial = \(q(p.backoff.initial.configString))\n"
            out += "backoff_max = \(q(p.backoff.maximum.configString))\n"
            out += "backoff_multiplier = \(p.backoff.multiplier)\nbackoff_jitter = \(p.backoff.jitter)\n"
            out += "backoff_reset_after = \(q(p.backoffResetAfter.configString))\n"
            out += "restart_limit = \(p.maxRestarts)\nrestart_window = \(q(p.restartWindow.configString))\n"
            out += "failed_retry_interval = \(q(p.failedRetryInterval.configString))\n"
            out += "start_timeout = \(q(p.startTimeout.configString))\nstop_timeout = \(q(p.stopTimeout.configString))\n"
            if let limit = w.memoryLimit { out += "memory_limit = \(limit)\n" }
            out += "output_rate_limit = \(w.outputRateLimit ?? 0)\n"
            let d = w.deviceProbe
            out += "device_probe = { type = \(q(d.kind.rawValue))"
            if d.kind == .command { out += ", command = [" + d.command.map(q).joined(separator: ", ") + "], healthy = \(q(d.healthy))" }
            if d.kind == .path { out += ", paths = [" + d.paths.map(q).joined(separator: ", ") + "]" }
            if d.kind != .none {
                out += ", interval = \(q(d.interval.configString)), timeout = \(q(d.timeout.configString)), failures = \(d.failures)"
                    + ", failed_interval = \(q(d.failedInterval.configString))"
            }
            out += " }\n"
            let i = w.inferenceProbe
            out += "inference_probe = { enabled = \(i.enabled), payload = \(q(i.payload)), interval = \(q(i.interval.configString)), "
                + "timeout = \(q(i.timeout.configString)), failures = \(i.failures), text_field = \(q(i.textField)) }\n"
            if w.isFallback {
                // Shown for reference only: fallback workers are configured in [fallback], not as devices.
                out = "\n# CPU fallback worker (from [fallback]):" + out.split(separator: "\n", omittingEmptySubsequences: false)
                    .dropFirst().map { $0.isEmpty ? "" : "\n# " + $0 }.joined()
                out += "\n"
            }
            out = whole + out
        }
        return out
    }

    static func q(_ s: String) -> String {
        var out = "\""
        for c in s.unicodeScalars {
            switch c {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            default: out.unicodeScalars.append(c)
            }
        }
        return out + "\""
    }
}
