# tpgw: a transparent proxy gateway (TPROXY + embedded mihomo).
# make build | test | demo | bench | lint | rules | openwrt  (see README.md)

GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT  ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
GOFILES := $(shell find . -name '*.go' -not -path './bin/*' 2>/dev/null)
# Tests that touch the kernel run in namespaces and may take a while.
TEST_TIMEOUT ?= 40m

.PHONY: build test race fuzz demo bench lint deps rules clean FORCE

## build: compile bin/tpgw (rebuilt when Go files change, relinked when the version stamp does)
build: bin/tpgw

# bin/tpgw carries VERSION and COMMIT (tpgw version, the bench's Machine line):
# bin/.version changes with them, so a commit or an edit relinks it even when no
# Go file changed (it used to keep the stamp of the tree it was built from).
bin/.version: FORCE
	@mkdir -p bin; v='$(VERSION) $(COMMIT)'; [ "$$(cat $@ 2>/dev/null)" = "$$v" ] || echo "$$v" > $@

bin/tpgw: $(GOFILES) go.mod go.sum bin/.version
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $@ ./cmd/tpgw

## deps: install the Debian packages the tests and demo need (root)
deps:
	./scripts/install-deps.sh

## test: install what is missing, then lint, unit tests, namespace end-to-end tests, bounded fuzzing
## (one test binary at a time: the UDP-loss and throughput checks must not share the 2 cores with a cross-compile)
test: deps build lint
	TPGW_BIN=$(CURDIR)/bin/tpgw $(GO) test -count=1 -run '^$$' ./... >/dev/null # compile every test binary with full parallelism first
	TPGW_BIN=$(CURDIR)/bin/tpgw TPGW_OPENWRT_ARCHES=all $(GO) test -p 1 -count=1 -timeout $(TEST_TIMEOUT) ./...
	$(MAKE) router-e2e
	$(MAKE) race
	$(MAKE) fuzz

## race: the packages whose goroutines share state (the engine's flows, fake-ip pools and journal, the DNS server, the relay) under the race detector
RACE_PKGS ?= ./engine/ ./dns/ ./relay/ ./internal/tsock/
race:
	TPGW_BIN=$(CURDIR)/bin/tpgw $(GO) test -race -p 1 -count=1 -timeout $(TEST_TIMEOUT) $(RACE_PKGS)

## fuzz: run each fuzz target for FUZZTIME executions (parsers of untrusted bytes)
# A count of executions, not a duration, and a short minimization of each new
# input (default 60s): a duration running out while the fuzzer minimizes ends
# in "context deadline exceeded", a failure that says nothing about the code.
FUZZTIME ?= 50000x
fuzz:
	$(GO) test -run='^$$' -fuzz='^FuzzHandleMessage$$' -fuzztime=$(FUZZTIME) -fuzzminimizetime=1s ./dns/
	$(GO) test -run='^$$' -fuzz='^FuzzParseOrigDst$$' -fuzztime=$(FUZZTIME) -fuzzminimizetime=1s ./internal/tsock/
	$(GO) test -run='^$$' -fuzz='^FuzzParse$$' -fuzztime=$(FUZZTIME) -fuzzminimizetime=1s ./config/

## demo: a demo gateway in throwaway namespaces; never touches the host's network
demo: deps build
	$(GO) run ./cmd/tpgw-demo -bin $(CURDIR)/bin/tpgw -c $(CURDIR)/config.example.yaml $(DEMO_FLAGS)

## bench: compare tpgw with kernel forwarding, mihomo's own tproxy and ss-redir in throwaway namespaces (root, ~15 min); writes docs/bench.{md,json,svg}
bench: build
	./scripts/install-deps.sh bench
	$(GO) build -trimpath -o bin/mihomo-tproxy ./bench/cmd/mihomo-tproxy
	$(GO) run ./bench/cmd/tpgw-bench -bin $(CURDIR)/bin/tpgw -helper $(CURDIR)/bin/mihomo-tproxy -out $(CURDIR)/docs

## lint: gofmt, go vet and staticcheck (fetched through the Go module proxy at STATICCHECK's version)
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
lint:
	@out=$$(gofmt -l $(GOFILES)); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

## rules: print the plan for config.example.yaml (no root needed)
rules: build
	./bin/tpgw rules -c config.example.yaml

## openwrt: cross-compile the router build (mihomo without what a router does not use, docs/size.md) for OpenWrt (x86_64, aarch64, arm, mipsle) and write .ipk packages to dist/openwrt; prints binary sizes
OPENWRT_OUT    ?= dist/openwrt
OPENWRT_ARCHES ?= x86_64,aarch64,arm,mipsle
.PHONY: openwrt router-e2e
openwrt:
	$(GO) run ./packaging/mkopenwrt -out $(OPENWRT_OUT) -arch $(OPENWRT_ARCHES) -version $(VERSION) -commit $(COMMIT)

## router-e2e: the router build's x86_64 binary relays through a real ss-server (e2e TestShadowsocks with it as TPGW_BIN)
router-e2e:
	$(GO) run ./packaging/mkopenwrt -out bin/openwrt -arch x86_64 -version $(VERSION) -commit $(COMMIT) >/dev/null
	TPGW_BIN=$(CURDIR)/bin/openwrt/bin/x86_64/tpgw $(GO) test -count=1 -run '^TestShadowsocks$$' ./e2e/

clean:
	rm -rf bin dist

FORCE:
