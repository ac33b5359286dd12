SHELL := /bin/bash
# npu-supervisor: the two commands of the README are `make run` and `make test`.
SWIFT ?= swift
CONFIG ?= config/example.toml
PREFIX ?= /usr/local

.PHONY: deps build release run test test-swift test-python bench install clean package test-package

deps:
	@scripts/install-deps.sh

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build -c release

# Builds, then runs the supervisor with 4 simulated NPU devices; sockets in ./run. Ctrl-C stops it cleanly.
run: build
	exec .build/debug/npu-supervisord --config $(CONFIG)

# Every test: Swift unit + real-process integration tests, then the Python library's tests.
test: build
	$(SWIFT) build --build-tests
	$(SWIFT) test 2>&1 | tee .build/swift-test.log; test $${PIPESTATUS[0]} -eq 0
	# The real-process suite again with exit detection forced onto the waitid thread (kernels without pidfd).
	NPU_SUPERVISOR_NO_PIDFD=1 $(SWIFT) test --skip-build --filter 'IntegrationTests\.' 2>&1 | tee .build/swift-test-nopidfd.log; test $${PIPESTATUS[0]} -eq 0
	python3 -m unittest discover -s python/tests 2>&1 | tee .build/python-test.log; test $${PIPESTATUS[0]} -eq 0

# Restart latency and idle memory of this build (BENCHMARKS.md has the side-by-side comparisons and their commands).
bench: release
	.build/release/npu-bench restart --repetitions 30 --served-ms 200
	.build/release/npu-bench idle --workers 4

# Binaries to $(DESTDIR)$(PREFIX)/bin, config to /etc/npu-supervisor/config.toml (an existing one is kept),
# systemd units, docs. See scripts/install.sh for SYSCONFDIR and UNITDIR.
install: release
	PREFIX=$(PREFIX) DESTDIR=$(DESTDIR) BUILD_DIR=.build/release scripts/install.sh

# .deb, .rpm and tarball in dist/: static, stripped binaries (built in .build-static), units, config, docs.
package: deps
	deploy/packaging/package.sh

# The packages' contents, then each one installed in a scratch root and run with the Swift toolchain hidden.
test-package: package
	deploy/packaging/test-package.sh

clean:
	rm -rf .build run
