# The README's two promises: `make run` and `make test` each do all of their own set-up.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdns-installed
SYSTEM_TOOLS := dnsperf dig nsd buildah debootstrap podman runc getcap promtool ip iptables \
	musl-gcc openssl
# Debian packages that provide the tools above (dig comes from bind9-dnsutils; podman needs
# runc because crun refuses the image test's cgroup set-up; getcap is libcap2-bin; ip and
# iptables set up the node-local tests' network namespaces; musl-gcc, musl-tools, builds the
# musl resolver client of the autopath test; openssl makes the API connection tests'
# certificates).
SYSTEM_PKGS := dnsperf bind9-dnsutils nsd buildah debootstrap podman runc libcap2-bin prometheus \
	iproute2 iptables musl-tools openssl

.PHONY: install run test test-repeat bench bench-short system-deps clean fuzz fuzz-smoke \
	fuzz-install sanitize

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard kdns/*.py kdns/*/*.py kdns/*/*.pyx kdns/*/*.pxd \
		kdns/*/*.pxi)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -c 'import kdns.packet._fastpath, kdns.zone._compile'
	touch $(STAMP)

# Names outside the example cluster are forwarded to the nameservers in RUN_RESOLV: none by
# default (they get REFUSED), so a demo never sends queries off this machine; use
# `make run RUN_RESOLV=/etc/resolv.conf` to forward through the machine's resolvers.
RUN_RESOLV ?= /dev/null

run: install
	@echo "kdns answers for examples/cluster.yaml on 127.0.0.1:5353. Try:"
	@echo "    dig @127.0.0.1 -p 5353 kubernetes.default.svc.cluster.local"
	@echo "    dig @127.0.0.1 -p 5353 _https._tcp.kubernetes.default.svc.cluster.local SRV"
	$(BIN)/kdns serve --from-file examples/cluster.yaml --dns-bind-address 127.0.0.1 \
		--dns-port 5353 --healthz-port 0 --metrics-port 0 --health-port 0 --ready-port 0 \
		--sidecar-port 0 --lameduck 0 --resolv-conf $(RUN_RESOLV) --config-dir /nonexistent

# Tools the tests and benchmarks drive; installed with apt when missing.
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		echo "installing $(SYSTEM_PKGS) with apt-get"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PKGS)) >/dev/null \
			|| { echo "could not install $(SYSTEM_PKGS): run as root or install them"; exit 1; }; \
	fi
	@# kubectl applies deploy/'s patches offline in the manifest tests. Debian's
	@# kubernetes-client, only when no kubectl is installed, because another package
	@# (a cloud SDK's, say) may already own /usr/bin/kubectl.
	@command -v kubectl >/dev/null || { echo "installing kubernetes-client with apt-get"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends kubernetes-client) >/dev/null \
		|| { echo "could not install kubernetes-client (kubectl): install kubectl"; exit 1; }; }

test: install system-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Flake finder: the suite N times on this tree, then each test that did not pass every time
# (tests/repeat.py). Run it on changes that touch timing, processes or sockets.
N ?= 3
test-repeat: install system-deps
	$(BIN)/python tests/repeat.py -n $(N) -- $(PYTEST_ARGS)

# Full benchmarks: micro-benchmarks of the per-packet function and of one compile after a
# change, the dnsperf/NSD/loadgen table and the fixed-rate one (CPU per query and p50/p99 at
# 20,000 and 100,000 queries/s offered, kdns and NSD on one core), then the API scale run (10,000 services listed and
# watched through a real kubeconfig: list/sync time, memory, programming latency; bench/README.md).
# Quiet machine wanted: the figures are ratios measured in one run.
bench: install system-deps
	$(BIN)/python -m pytest bench/test_micro.py bench/test_compile.py -q --benchmark-only
	$(BIN)/python bench/load.py
	$(BIN)/python bench/bench_api_scale.py

# The short version CI prints: same code paths, smaller cluster, a couple of seconds per cell;
# the fixed-rate table at the goal's two rates, kdns beside NSD (about 20 s of the minute).
bench-short: install system-deps
	$(BIN)/python -m pytest bench/test_micro.py -q --benchmark-only --benchmark-max-time=0.2 --benchmark-min-rounds=3
	$(BIN)/python -m pytest bench/test_compile.py -q --benchmark-only
	$(BIN)/python bench/load.py --short --fixed-rates 20000,100000 --targets nsd,kdns1,kdns1hold,kdns2,floor
	$(BIN)/python bench/bench_api_scale.py --services 1000 --seconds 5 \
		--out bench/out/api_scale_short.json

# Coverage-guided fuzzing (tests/fuzz/run.py): the compiled answer function against the
# reference path, TCP framing, both upstream-reply scanners, the zone-file loader. Prints
# target, executions, crashes, mismatches; findings land in tests/fuzz/findings/.
FUZZ_SECONDS ?= 60
FUZZ_STAMP := $(VENV)/.kdns-fuzz-installed

fuzz-install: $(FUZZ_STAMP)

# The 'fuzz' extra's packages only: `pip install -e '.[fuzz]'` would rebuild the extensions.
$(FUZZ_STAMP): $(STAMP)
	$(BIN)/python -c 'import subprocess, sys, tomllib; subprocess.check_call([sys.executable, \
		"-m", "pip", "install", "-q", *tomllib.load(open("pyproject.toml", "rb"))["project"] \
		["optional-dependencies"]["fuzz"]])'
	touch $(FUZZ_STAMP)

fuzz: fuzz-install
	nice $(BIN)/python tests/fuzz/run.py fuzz --seconds $(FUZZ_SECONDS)

# CI's bounded run: about a minute over all four targets, then the seeds replayed.
fuzz-smoke: fuzz-install
	$(BIN)/python tests/fuzz/run.py fuzz --seconds 12
	$(BIN)/python tests/fuzz/run.py replay --mutations 20

# The extensions built with AddressSanitizer/UBSan in build/asan/, then the fuzz seeds,
# findings and mutations and the packet-path tests against that build; fails on any report.
sanitize: install
	tests/fuzz/sanitize.sh

clean:
	rm -rf $(VENV) build kdns/*/*.c kdns/*/*.so *.egg-info
