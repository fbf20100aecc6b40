# rsbalancer: `make run` and `make test` do all set-up on a fresh Debian 12.
#
#   make run      install what is missing, build, start mock LLM nodes + the gateway
#   make demo-load  concurrent load on the running demo, in phases (another terminal)
#   make test     install what is missing, build, run every test
#   make bench    micro and end-to-end benchmarks (figures go in docs/benchmarks.md)
#   make install  copy the library, Lua files, nginx snippets and Perl check under $(PREFIX)
#   make deb      a Debian package (build/rsbalancer_<version>_<arch>.deb) for Debian's nginx
#   make check-config CONFIG=path.json   validate a pool config (what nginx -t does with nginx-conf/perl)
#   make header   regenerate include/rsbalancer.h (cbindgen) and lua/resty/rsbalancer/cdef.lua from it
#   make lint     rustfmt and clippy
#   make fuzz     every fuzz target (fuzz/) for FUZZ_SECONDS each; fuzz-smoke: ~1.5 minutes in all

PREFIX     ?= /usr/local
LUA_CDIR   ?= $(PREFIX)/lib/lua/5.1
LUA_LDIR   ?= $(PREFIX)/share/lua/5.1
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PERL_DIR   ?= $(PREFIX)/share/rsbalancer/perl
SNIPPET_DIR ?= $(PREFIX)/share/rsbalancer/nginx
VERSION    := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
CARGO      ?= cargo
BUILD      := build
# The Lua module (mlua + C ABI): resolves lua_* symbols from the host LuaJIT.
LUA_SO     := target/release/librsbalancer.so
# The plain C library (C ABI only, no Lua symbols): what C programs link.
C_SO       := target/c/release/librsbalancer.so
SOURCES    := $(shell find src -name '*.rs') Cargo.toml build.rs

.PHONY: check-config all deps build run demo-load test test-rust test-c test-lua test-nginx test-prometheus test-deb test-demo bench install install-lua deb header lint clean fuzz fuzz-build fuzz-smoke

all: build

deps:
	@scripts/install-deps.sh

build: $(BUILD)/lib/rsbalancer.so $(BUILD)/lib/librsbalancer.so

$(LUA_SO): $(SOURCES)
	$(CARGO) build --release

$(C_SO): $(SOURCES)
	$(CARGO) build --release --no-default-features --target-dir target/c

# Lua finds modules as <name>.so on package.cpath; ffi.load uses the same file.
# Copy then rename: overwriting a mapped .so in place would crash running nginx.
$(BUILD)/lib/rsbalancer.so: $(LUA_SO)
	@mkdir -p $(BUILD)/lib
	cp $< $@.tmp && mv -f $@.tmp $@

$(BUILD)/lib/librsbalancer.so: $(C_SO)
	@mkdir -p $(BUILD)/lib
	cp $< $@.tmp && mv -f $@.tmp $@

run: deps build
	@scripts/demo.sh

# Concurrent load on the running demo (`make run` in another terminal), in phases.
demo-load:
	@scripts/demo-load.sh

test: deps build
	$(MAKE) --no-print-directory test-rust test-c test-lua test-nginx test-prometheus test-deb test-demo fuzz-smoke
	@echo "make test: all suites passed"

# Every Rust test target but the nginx one (run by test-nginx, serially).
NGINX_TESTS := tests/nginx.rs tests/nginx_policy.rs tests/nginx_canary.rs tests/nginx_emergency.rs \
               tests/nginx_metrics.rs tests/nginx_admin.rs tests/nginx_admission.rs tests/nginx_chaos.rs \
               tests/nginx_defects.rs tests/nginx_rounds.rs tests/nginx_providers.rs tests/nginx_queue.rs \
               tests/nginx_cluster.rs tests/nginx_fleet_queue.rs tests/nginx_discovery.rs \
               tests/nginx_fleet_limits.rs tests/nginx_fleet_budgets.rs \
               tests/nginx_headroom.rs \
               tests/nginx_stream.rs \
               tests/nginx_prefix.rs \
               tests/nginx_consul.rs
RUST_TESTS := $(patsubst tests/%.rs,--test %,$(filter-out $(NGINX_TESTS),$(wildcard tests/*.rs)))

test-rust:
	$(CARGO) test --no-default-features --lib $(RUST_TESTS)
	$(CARGO) test --no-default-features --doc

test-c: $(BUILD)/lib/librsbalancer.so
	@scripts/test-c.sh

test-lua: $(BUILD)/lib/rsbalancer.so
	@scripts/test-lua.sh

test-nginx: $(BUILD)/lib/rsbalancer.so
	RSB_LUA_SO=$(CURDIR)/$(BUILD)/lib/rsbalancer.so $(CARGO) test --no-default-features $(patsubst tests/%.rs,--test %,$(NGINX_TESTS)) -- --test-threads=1

bench: deps build
	$(CARGO) bench --no-default-features --bench select
	$(CARGO) bench --no-default-features --bench metrics
	$(CARGO) bench --no-default-features --bench scale
	@scripts/bench-lua.sh
	@scripts/bench-nginx-pick.sh
	@scripts/bench-gateway.sh
	$(CARGO) bench --no-default-features --bench cluster
	@scripts/bench-instructions.sh
	@scripts/bench-throughput.sh

# The Lua module and files: what the LuaRocks rockspec installs (LUA_CDIR, LUA_LDIR).
install-lua: build
	install -d $(DESTDIR)$(LUA_CDIR) $(DESTDIR)$(LUA_LDIR)/resty/rsbalancer
	install -m 0755 $(BUILD)/lib/rsbalancer.so $(DESTDIR)$(LUA_CDIR)/rsbalancer.so
	install -m 0644 lua/resty/rsbalancer.lua $(DESTDIR)$(LUA_LDIR)/resty/rsbalancer.lua
	install -m 0644 lua/resty/rsbalancer/*.lua $(DESTDIR)$(LUA_LDIR)/resty/rsbalancer/

# Everything: also the C library and header, the Perl check (nginx-conf/perl) and the
# nginx snippets (nginx-conf/snippets). `make deb` runs it with Debian's paths.
install: install-lua
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(PERL_DIR) $(DESTDIR)$(SNIPPET_DIR)
	install -m 0755 $(BUILD)/lib/librsbalancer.so $(DESTDIR)$(LIBDIR)/librsbalancer.so
	install -m 0644 include/rsbalancer.h $(DESTDIR)$(INCLUDEDIR)/rsbalancer.h
	install -m 0644 nginx-conf/perl/RsbalancerCheck.pm $(DESTDIR)$(PERL_DIR)/
	install -m 0644 nginx-conf/snippets/*.conf $(DESTDIR)$(SNIPPET_DIR)/

# A Debian package for Debian's nginx + lua-nginx-module (scripts/build-deb.sh: the
# paths and why); test-deb installs it into a scratch root and serves a request with
# the snippets it installed, and lints the LuaRocks rockspec.
DEB = $(BUILD)/rsbalancer_$(VERSION)-1_$(shell dpkg --print-architecture).deb

deb: build
	@scripts/build-deb.sh "$(DEB)"

test-deb: deb
	@scripts/test-deb.sh "$(DEB)"

# The README's first screen: `make run`'s demo and `make demo-load` against it.
test-demo: build
	@scripts/test-demo.sh

# Alert and recording rules (nginx-conf/prometheus/): syntax, the sample scrape config,
# and the rule unit tests (alerts that must fire and must not).
PROM_DIR := nginx-conf/prometheus
test-prometheus:
	@command -v promtool >/dev/null || { echo "test-prometheus: promtool not found (Debian: apt-get install prometheus; make deps)" >&2; exit 1; }
	promtool check rules $(PROM_DIR)/rsbalancer.rules.yml $(PROM_DIR)/rsbalancer.alerts.yml
	promtool check config $(PROM_DIR)/prometheus.yml
	cd $(PROM_DIR) && promtool test rules rsbalancer.rules.test.yml

check-config: $(BUILD)/lib/rsbalancer.so
	@test -n "$(CONFIG)" || { echo "usage: make check-config CONFIG=path/to/rsbalancer.json" >&2; exit 2; }
	@scripts/check-config.sh "$(CONFIG)"

# Fuzzing (fuzz/, its own Cargo package): libFuzzer from the libfuzzer-sys crate, built
# on stable Rust with LLVM's SanitizerCoverage passes switched on by these flags (what
# cargo-fuzz passes, less the nightly-only sanitizer). --target keeps the flags off
# build scripts. Seeds: fuzz/seeds/<target> (committed); the growing corpus and crash
# artifacts: fuzz/corpus, fuzz/artifacts (git-ignored). A crash fails the run.
FUZZ_TARGETS ?= config admin abi retry_after model scrape ratelimit stream prefix consul
FUZZ_SECONDS ?= 60
FUZZ_SMOKE_SECONDS ?= 15
FUZZ_HOST    := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
FUZZ_BIN     := fuzz/target/$(FUZZ_HOST)/release
FUZZ_FLAGS   := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
                -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
                -Cllvm-args=-sanitizer-coverage-pc-table \
                -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing
# libFuzzer's own C++ sources are built by libfuzzer-sys with the system C++ compiler.
FUZZ_CXX     ?= c++

fuzz-build:
	@command -v $(FUZZ_CXX) >/dev/null || { echo "fuzz: $(FUZZ_CXX) not found (Debian: apt-get install g++; make deps)" >&2; exit 1; }
	cd fuzz && RUSTFLAGS="$(FUZZ_FLAGS)" $(CARGO) build --release --target $(FUZZ_HOST) $(patsubst %,--bin %,$(FUZZ_TARGETS))

fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do scripts/fuzz-run.sh "$(FUZZ_BIN)" "$$t" "$(FUZZ_SECONDS)" || exit 1; done

fuzz-smoke: fuzz-build
	@for t in $(FUZZ_TARGETS); do scripts/fuzz-run.sh "$(FUZZ_BIN)" "$$t" "$(FUZZ_SMOKE_SECONDS)" || exit 1; done

header:
	UPDATE_HEADER=1 $(CARGO) test --no-default-features --test header

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-features --all-targets -- -D warnings
	cd fuzz && $(CARGO) fmt --check && $(CARGO) clippy --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf fuzz/target
	rm -rf $(BUILD)
