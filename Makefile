# seamless — snapshot running containers into registry images.
GO       ?= go
BIN      ?= bin
PREFIX   ?= /usr/local
GOFLAGS  ?= -buildvcs=false
export GOFLAGS

.PHONY: all build deps test unit integration vet demo demo-clean clean

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

clean:
	rm -rf $(BIN)
