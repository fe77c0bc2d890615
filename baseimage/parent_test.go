package baseimage

import (
	"os"
	"testing"
)

func TestParseShimCmdline(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want ShimArgs
		ok   bool
	}{
		{
			name: "runc v2 shim",
			args: []string{"/usr/bin/containerd-shim-runc-v2", "-namespace", "k8s.io", "-id", "abc", "-address", "/run/containerd/containerd.sock"},
			want: ShimArgs{Address: "/run/containerd/containerd.sock", Namespace: "k8s.io", ID: "abc"},
			ok:   true,
		},
		{
			name: "double dashes and equals",
			args: []string{"containerd-shim-runc-v2", "--namespace=default", "-address=/tmp/c.sock", "--id", "x1", "-publish-binary", "/usr/bin/containerd"},
			want: ShimArgs{Address: "/tmp/c.sock", Namespace: "default", ID: "x1"},
			ok:   true,
		},
		{
			name: "other flags with values are skipped",
			args: []string{"containerd-shim-runc-v2", "-debug", "-namespace", "ns", "-address", "/a.sock", "start"},
			want: ShimArgs{Address: "/a.sock", Namespace: "ns"},
			ok:   true,
		},
		{
			name: "missing address",
			args: []string{"containerd-shim-runc-v2", "-namespace", "ns", "-id", "c"},
			want: ShimArgs{Namespace: "ns", ID: "c"},
		},
		{
			name: "dangling flag",
			args: []string{"containerd-shim-runc-v2", "-namespace", "ns", "-address"},
			want: ShimArgs{Namespace: "ns"},
		},
		{
			name: "not a shim",
			args: []string{"/usr/bin/bash", "-namespace", "ns", "-address", "/a.sock"},
		},
		{name: "empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := ParseShimCmdline(tt.args)
			if got != tt.want || ok != tt.ok {
				t.Errorf("ParseShimCmdline(%q) = %+v, %v; want %+v, %v", tt.args, got, ok, tt.want, tt.ok)
			}
		})
	}
}

func TestSplitCmdline(t *testing.T) {
	got := SplitCmdline([]byte("containerd-shim-runc-v2\x00-namespace\x00default\x00\x00"))
	want := []string{"containerd-shim-runc-v2", "-namespace", "default", ""}
	if len(got) != 3 {
		t.Fatalf("SplitCmdline = %q, want %q", got, want[:3])
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("SplitCmdline = %q, want %q", got, want[:3])
		}
	}
	if SplitCmdline(nil) != nil {
		t.Fatal("SplitCmdline(nil) != nil")
	}
}

func TestResolveContainerdEnvOverrides(t *testing.T) {
	shim := []string{"containerd-shim-runc-v2", "-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock", "-id", "c"}
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

	addr, ns, ok := resolveContainerd(shim, env(nil))
	if addr != "/run/containerd/containerd.sock" || ns != "k8s.io" || !ok {
		t.Errorf("from shim: %q %q %v", addr, ns, ok)
	}
	addr, ns, ok = resolveContainerd(shim, env(map[string]string{EnvContainerdAddress: "/x.sock"}))
	if addr != "/x.sock" || ns != "k8s.io" || !ok {
		t.Errorf("address override: %q %q %v", addr, ns, ok)
	}
	addr, ns, ok = resolveContainerd([]string{"bash"}, env(map[string]string{EnvContainerdAddress: "/x.sock", EnvContainerdNamespace: "n"}))
	if addr != "/x.sock" || ns != "n" || !ok {
		t.Errorf("env only: %q %q %v", addr, ns, ok)
	}
	if _, _, ok := resolveContainerd([]string{"bash"}, env(map[string]string{EnvContainerdAddress: "/x.sock"})); ok {
		t.Error("address without namespace: ok")
	}
}

func TestParentContainerdNotAShim(t *testing.T) {
	t.Setenv(EnvContainerdAddress, "")
	t.Setenv(EnvContainerdNamespace, "")
	// The test binary's parent is `go test` (or a shell), never a shim.
	if _, err := os.ReadFile("/proc/self/cmdline"); err != nil {
		t.Skip("no /proc")
	}
	if addr, ns, ok := ParentContainerd(); ok {
		t.Fatalf("ParentContainerd() = %q, %q, true under a non-shim parent", addr, ns)
	}
}
