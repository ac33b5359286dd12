// libFuzzer target: the TOML config loader (ConfigLoader.parse: toml++ through TOMLReader, then
// SupervisorConfiguration(parsing:baseDirectory:)). Its one documented error is ConfigError.
import SupervisorCore

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzConfig(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    do {
        _ = try ConfigLoader.parse(text, path: "/nonexistent-npu-fuzz/supervisor.toml")
    } catch is ConfigError {
    } catch {
        preconditionFailure("ConfigLoader.parse threw \(type(of: error)): \(error)")
    }
    return 0
}
