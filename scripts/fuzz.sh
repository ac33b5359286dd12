#!/usr/bin/env bash
# Builds the libFuzzer targets in Fuzz/ with swiftc (-sanitize=fuzzer,address) against the library's sources and
# the SwiftPM debug build of the dependencies, then runs them on the corpus in Fuzz/corpus/TARGET.
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]      TARGET: frame, options, control, config (default all, 60 s each)
#   FUZZ_RUNS=N scripts/fuzz.sh TARGET           a fixed number of executions instead of a time limit
#   FUZZ_BUILD_ONLY=1 scripts/fuzz.sh            build, do not run
#   FUZZ_OUT=DIR scripts/fuzz.sh ...             binaries, logs and found inputs in DIR (default .build/fuzz)
#   FUZZ_RELEASE=1 scripts/fuzz.sh ...           link the dependencies' release build (swift build -c release):
#                                                the long runs; SwiftNIO at -Onone dominates the frame and control
#                                                targets' time (perf: ByteBuffer's integer packing)
#
# New inputs libFuzzer finds go to OUT/corpus/TARGET (the seeds in Fuzz/corpus stay as they are); a crash leaves
# its input in OUT/crash-TARGET-*. Each run's log is OUT/TARGET.log. OUT is .build/fuzz unless FUZZ_OUT says.
# Exit status: 0 when every target ran clean, 1 on a finding, 77 when this toolchain cannot build a fuzzer
# (`scripts/fuzz.sh probe` checks only that).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=${1:-all}
seconds=${2:-60}
out=${FUZZ_OUT:-$root/.build/fuzz}
configuration=debug
[ -n "${FUZZ_RELEASE:-}" ] && configuration=release
deps=${FUZZ_DEPS:-$root/.build/$configuration}
checkouts=${deps%/*}/checkouts  # textual: .build/debug is a symlink
mkdir -p "$out"

if ! swiftc -sanitize=fuzzer,address -parse-as-library -o "$out/probe" - <<<'@_cdecl("LLVMFuzzerTestOneInput") public func f(_ d: UnsafePointer<UInt8>, _ n: Int) -> Int32 { 0 }' \
        >"$out/probe.log" 2>&1; then
    echo "fuzz.sh: this toolchain cannot build a libFuzzer binary (swiftc -sanitize=fuzzer,address):" >&2
    tail -5 "$out/probe.log" >&2
    exit 77
fi

[ "$target" = probe ] && exit 0

# The dependencies' objects (never instrumented: coverage is for this project's code).
# (The harnesses compile this project's sources themselves; only NIO's objects and the TOML parser's (toml++ and
# its Swift wrapper, TOMLReader) come from here.)
# Only when missing: under `swift test`, which holds the build folder's lock, a `swift build` here would wait for
# ever (and a source's mtime cannot tell staleness: SwiftPM leaves an unchanged module's files untouched). After a
# change to TOMLReader or CTOMLParser, `swift build` first (the suite does).
if [ ! -f "$deps/Modules/NIOCore.swiftmodule" ] || [ ! -f "$deps/Modules/TOMLReader.swiftmodule" ] \
    || [ ! -f "$deps/CTOMLParser.build/CTOMLParser.cpp.o" ]; then
    swift build -c "$configuration" --target WireProtocol --target TOMLReader >"$out/swift-build.log" 2>&1 \
        || { tail -20 "$out/swift-build.log" >&2; exit 1; }
fi
objects() {  # objects MODULE...: into the array objs (some file names have spaces)
    objs=()
    local m
    for m in "$@"; do
        mapfile -d '' -O "${#objs[@]}" objs < <(find "$deps/$m.build" -name '*.o' ! -name '*.swiftmodule.o' -print0)
    done
}

flags=(-sanitize=fuzzer,address -parse-as-library -O -g -I "$deps/Modules")
# The C modules the dependencies' Swift modules import: SwiftPM's generated module maps, or the packages' own.
for map in "$deps"/*.build/module.modulemap; do flags+=(-Xcc -fmodule-map-file="$map"); done
for map in "$checkouts"/*/Sources/*/include/module.modulemap; do  # where SwiftPM generated none
    name=${map%/include/module.modulemap}; name=${name##*/}
    [ -f "$deps/$name.build/module.modulemap" ] || flags+=(-Xcc -fmodule-map-file="$map")
done
nio=(NIOCore NIOConcurrencyHelpers _NIODataStructures _NIOBase64 CNIOLinux CNIODarwin CNIOWindows CNIOWASI
     CNIOOpenBSD CNIOAtomics Atomics _AtomicsShims DequeModule InternalCollectionsUtilities ContainersPreview)

fresh() {  # fresh BIN SOURCE...: built from these sources against these dependencies
    [ -x "$1" ] && [ "$(cat "$1.deps" 2>/dev/null)" = "$deps" ] && [ -z "$(find "${@:2}" -newer "$1")" ]
}

build() {  # build TARGET: .build/fuzz/TARGET, rebuilt when a source is newer or the dependencies changed
    local name=$1 bin=$out/$1 sources
    case $name in
        frame|options|control)
            local harness=Fuzz/Fuzz${name^}.swift
            sources=(Sources/WireProtocol/*.swift "$harness")
            if fresh "$bin" "${sources[@]}"; then return; fi
            # -module-name WireProtocol: the harness is one more file of the library.
            objects "${nio[@]}"
            swiftc "${flags[@]}" -module-name WireProtocol "${sources[@]}" "${objs[@]}" -o "$bin" \
                >"$out/build-$name.log" 2>&1 || { cat "$out/build-$name.log" >&2; return 1; }
            ;;
        config)
            sources=(Sources/SupervisorCore Sources/SupervisorPaths Sources/TOMLReader Sources/CTOMLParser
                     Sources/SupervisorRuntime/ConfigLoader.swift Fuzz/FuzzConfig.swift)
            if fresh "$bin" "${sources[@]}"; then return; fi
            # SupervisorPaths and SupervisorCore instrumented as their own modules, then ConfigLoader.swift and the
            # harness as the main module (ConfigLoader's helpers it needs come with it).
            local mod=$out/config-modules
            mkdir -p "$mod"
            swiftc -I "$mod" "${flags[@]}" -module-name SupervisorPaths -emit-module -emit-module-path "$mod/SupervisorPaths.swiftmodule" \
                -c -wmo Sources/SupervisorPaths/*.swift -o "$mod/SupervisorPaths.o" >"$out/build-$name.log" 2>&1 \
                || { cat "$out/build-$name.log" >&2; return 1; }
            swiftc -I "$mod" "${flags[@]}" -module-name SupervisorCore -emit-module -emit-module-path "$mod/SupervisorCore.swiftmodule" \
                -c -wmo $(find Sources/SupervisorCore -name '*.swift') -o "$mod/SupervisorCore.o" >>"$out/build-$name.log" 2>&1 \
                || { cat "$out/build-$name.log" >&2; return 1; }
            objects TOMLReader CTOMLParser
            swiftc -I "$mod" "${flags[@]}" -module-name FuzzConfig Sources/SupervisorRuntime/ConfigLoader.swift \
                Fuzz/FuzzConfig.swift "$mod/SupervisorPaths.o" "$mod/SupervisorCore.o" "${objs[@]}" \
                -lstdc++ -o "$bin" >>"$out/build-$name.log" 2>&1 || { cat "$out/build-$name.log" >&2; return 1; }
            ;;
        *) echo "fuzz.sh: unknown target $name (frame, options, control, config)" >&2; return 2 ;;
    esac
    echo "$deps" >"$bin.deps"
}

run() {  # run TARGET
    local name=$1 corpus=$out/corpus/$1 limit maxlen=4096
    [ "$name" = config ] && maxlen=16384  # example.toml is ~5 KB
    mkdir -p "$corpus"
    if [ -n "${FUZZ_RUNS:-}" ]; then limit=(-runs="$FUZZ_RUNS"); else limit=(-max_total_time="$seconds"); fi
    # SWIFT_BACKTRACE=enable=no: the Swift runtime's backtracer, reading memory after a trap, trips ASan itself and
    # hides the real report. Output to a file, never a pipe (a pipe once kept the run from returning). -rss_limit_mb and -malloc_limit_mb
    # make an unbounded allocation a finding; -timeout makes a hang one.
    local status=0
    (cd "$out" && SWIFT_BACKTRACE=enable=no ASAN_OPTIONS=detect_leaks=0 "./$name" "${limit[@]}" -max_len=$maxlen -rss_limit_mb=1024 \
        -malloc_limit_mb=256 -timeout=10 -print_final_stats=1 -artifact_prefix="$out/crash-$name-" \
        "$corpus" "$root/Fuzz/corpus/$name" >"$out/$name.log" 2>&1) || status=$?
    local runs elapsed
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/$name.log")
    elapsed=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$out/$name.log")
    if [ "$status" -ne 0 ]; then
        echo "fuzz.sh: $name FAILED (exit $status), see $out/$name.log:" >&2
        grep -E 'ERROR|Fatal|Precondition|crash-|timeout|rss|malloc' "$out/$name.log" | head -20 >&2
        return 1
    fi
    echo "$name: ${runs:-?} executions in ${elapsed:-?} s, no crash, hang or over-limit allocation"
}

targets=(frame options control config)
[ "$target" = all ] || targets=("$target")
for t in "${targets[@]}"; do build "$t"; done
[ -n "${FUZZ_BUILD_ONLY:-}" ] && exit 0
failed=0
for t in "${targets[@]}"; do run "$t" || failed=1; done
exit $failed
