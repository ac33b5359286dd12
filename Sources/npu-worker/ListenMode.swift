import Glibc
import NIOCore
import WireProtocol
import WorkerKit

/// `npu-worker --listen PATH`: serve frames on a Unix socket of its own, one thread per connection, echoing
/// every request payload. This is the "client talks to a worker directly" baseline of the proxy benchmarks
/// (and the backend HAProxy forwards to); it is not how the supervisor runs workers.
enum ListenMode {
    static func serve(path: String) -> Never {
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard fd >= 0, bound == 0, listen(fd, 512) == 0 else {
            printErr("npu-worker: cannot listen on \(path): \(String(cString: strerror(errno)))")
            exit(1)
        }
        printErr("npu-worker: echoing on \(path)")
        while true {
            let client = accept(fd, nil, nil)
            if client < 0 { continue }
            Thread.detach {
                let io = BlockingFrameIO(fd: client)
                while let frame = try? io.readFrame() {
                    guard frame.type == .request else { continue }
                    try? io.write(Frame(type: .response, requestID: frame.requestID, payload: frame.payload))
                }
                close(client)
            }
        }
    }
}
