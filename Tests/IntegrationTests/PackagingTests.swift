import Foundation
import TestSupport
import Testing

/// The packages (`make package`, deploy/packaging/). Building the static binaries takes minutes, so the suite
/// does not: it packages the debug build with the same script (fast compression) and checks the contents of the
/// .deb, the .rpm and the tarball; the run-without-Swift smoke test packages the static binaries that
/// `make package` left in .build-static (CI runs `make package` before `make test`), and is skipped, saying so,
/// where there are none.
@Suite(.serialized, .enabled(if: ProcessInfo.processInfo.environment["NPU_SUPERVISOR_NO_PIDFD"] == nil,
                              "packaging is not about exit detection: not again in make test's NO_PIDFD pass"))
struct PackagingTests {
    static let staticBuild = PackagePaths.root + "/.build-static/release"
    static var haveStaticBuild: Bool { FileManager.default.isExecutableFile(atPath: staticBuild + "/npu-supervisord") }

    static func package(from buildDir: String, dynamic: Bool) throws -> String {
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("pkg-\(UUID().uuidString.prefix(6))").path
        var env = ProcessInfo.processInfo.environment
        env["BUILD_DIR"] = buildDir
        env["OUT"] = out
        env["FAST"] = "1"
        if dynamic { env["ALLOW_DYNAMIC"] = "1" }
        let r = try runCommand(PackagePaths.root + "/deploy/packaging/package.sh", [], environment: env, timeout: 600)
        #expect(r.status == 0, "package.sh: \(r.stderr)")
        return out
    }

    static func check(_ dist: String, smoke: Bool, dynamic: Bool) throws -> CommandResult {
        var env = ProcessInfo.processInfo.environment
        env["DIST"] = dist
        env["SMOKE"] = smoke ? "1" : "0"
        if dynamic { env["ALLOW_DYNAMIC"] = "1" }
        env["DYNAMIC_PROBE"] = Binaries.supervisord  // the debug build needs the toolchain: must not start
        return try runCommand(PackagePaths.root + "/deploy/packaging/test-package.sh", [], environment: env, timeout: 300)
    }

    @Test func thePackageScriptBuildsADebAnRPMAndATarballWithEverything() throws {
        let dist = try Self.package(from: Binaries.directory, dynamic: true)
        defer { try? FileManager.default.removeItem(atPath: dist) }
        let r = try Self.check(dist, smoke: false, dynamic: true)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(r.stdout.contains("ok: deb contents") && r.stdout.contains("ok: rpm contents")
                && r.stdout.contains("ok: tarball contents"))
    }

    @Test func aDynamicallyLinkedBuildIsRefused() throws {
        var env = ProcessInfo.processInfo.environment
        env["BUILD_DIR"] = Binaries.directory
        env["OUT"] = FileManager.default.temporaryDirectory.appendingPathComponent("pkg-refused").path
        let r = try runCommand(PackagePaths.root + "/deploy/packaging/package.sh", [], environment: env)
        #expect(r.status != 0 && r.stderr.contains("links the Swift runtime dynamically"))
    }

    @Test(.enabled(if: haveStaticBuild, "no static build in .build-static/release: run `make package` first"))
    func theInstalledPackagesRunWithTheSwiftToolchainHidden() throws {
        let dist = try Self.package(from: Self.staticBuild, dynamic: false)
        defer { try? FileManager.default.removeItem(atPath: dist) }
        let r = try Self.check(dist, smoke: true, dynamic: false)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        for kind in ["deb", "rpm", "tgz"] {
            #expect(r.stdout.contains("ok: \(kind) installed: start, infer (socket and HTTP), status, shutdown"))
        }
    }
}
