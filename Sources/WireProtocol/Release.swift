/// The npu-supervisor release this build belongs to (`--version` of the programs that do not link the daemon's
/// runtime; an integration test checks that it matches the daemon's).
public let npuSupervisorRelease = "0.1.0"
