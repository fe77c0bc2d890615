# seamless — snapshot running containers into registry images.
GO       ?= go
BIN      ?= bin
PREFIX   ?= /usr/local
GOFLAGS  ?= -buildvcs=false
export GOFLAGS

.PHONY: all build deps test unit integration vet demo demo-clean bench clean install uninstall install-hook install-containerd

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...

deps:
	./hack/install-deps.sh

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { gofmt -l .; echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

## test: unit and integration tests (real runc, containerd, registry, overlayfs, cgroups); needs root.
test: deps vet build
	$(GO) test -count=1 -timeout 25m ./...

unit: build
	$(GO) test -count=1 -short ./...

## demo: containerd + runc + local registry; snapshot a running container and run the result.
demo: deps build
	$(GO) run ./integration/demo --bin $(abspath $(BIN))

demo-clean:
	$(GO) run ./integration/demo --clean

## bench: pause, freezer and upload benchmarks on real containerd/runc/registry
## (needs root; ~25 min; ARGS=--quick for a ~3 min smoke run, ARGS="--sections pause,freezer"
## without the upload section; see `go run ./integration/bench -h`).
## Writes bench-results/ (results.json, summary.txt, pause.png).
bench: deps
	$(GO) run ./integration/bench $(ARGS)

clean:
	rm -rf $(BIN)

## install: binaries to $(DESTDIR)$(BINDIR), engine config examples to
## $(DESTDIR)$(EXAMPLESDIR); no engine's config is touched. Opt-in:
## install-hook (podman/CRI-O OCI hook), install-containerd (runtime in
## containerd's config, see packaging/kubernetes/install-node.sh).
BINDIR      ?= $(PREFIX)/bin
EXAMPLESDIR ?= $(PREFIX)/share/seamless
HOOKSDIR    ?= /usr/share/containers/oci/hooks.d
PROGRAMS    := seamless seamless-runc seamless-hook
EXAMPLES    := containerd/seamless.toml containerd/seamless-v3.toml kubernetes/runtimeclass.yaml \
               kubernetes/install-node.sh docker/daemon.json podman/containers.conf oci-hooks/seamless-hook.json

install: build
	install -d $(DESTDIR)$(BINDIR)
	install -m 0755 $(addprefix $(BIN)/,$(PROGRAMS)) $(DESTDIR)$(BINDIR)/
	@set -e; for f in $(EXAMPLES); do \
	  install -d $(DESTDIR)$(EXAMPLESDIR)/$$(dirname $$f); \
	  sed 's|/usr/local/bin|$(BINDIR)|g' packaging/$$f > $(DESTDIR)$(EXAMPLESDIR)/$$f; \
	  chmod 0644 $(DESTDIR)$(EXAMPLESDIR)/$$f; \
	done; chmod 0755 $(DESTDIR)$(EXAMPLESDIR)/kubernetes/install-node.sh
	@echo "installed $(PROGRAMS) in $(DESTDIR)$(BINDIR), examples in $(DESTDIR)$(EXAMPLESDIR)"

install-hook:
	install -d $(DESTDIR)$(HOOKSDIR)
	sed 's|/usr/local/bin|$(BINDIR)|g' packaging/oci-hooks/seamless-hook.json > $(DESTDIR)$(HOOKSDIR)/seamless-hook.json
	chmod 0644 $(DESTDIR)$(HOOKSDIR)/seamless-hook.json

install-containerd: build
	packaging/kubernetes/install-node.sh --from $(BIN) --prefix $(PREFIX) $(if $(DESTDIR),--root $(DESTDIR))

uninstall:
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,$(PROGRAMS))
	rm -f $(addprefix $(DESTDIR)$(EXAMPLESDIR)/,$(EXAMPLES))
	-rmdir $(addprefix $(DESTDIR)$(EXAMPLESDIR)/,containerd kubernetes docker podman oci-hooks) $(DESTDIR)$(EXAMPLESDIR) 2>/dev/null
	rm -f $(DESTDIR)$(HOOKSDIR)/seamless-hook.json
	@echo "removed $(PROGRAMS), the examples and the OCI hook; a runtime added with install-containerd stays: packaging/kubernetes/install-node.sh --uninstall"
