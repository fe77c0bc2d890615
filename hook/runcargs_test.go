package hook

import (
	"reflect"
	"testing"
)

func TestParseRuncArgs(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want RuncCall
	}{
		{
			args: []string{"--root", "/r", "--log", "/b/log.json", "--log-format", "json", "create", "--bundle", "/b", "--pid-file", "/b/init.pid", "c1"},
			want: RuncCall{Root: "/r", Log: "/b/log.json", LogFormat: "json", Command: "create", ContainerID: "c1", Bundle: "/b"},
		},
		{
			args: []string{"--root=/r", "--systemd-cgroup", "create", "-b", "/b", "--console-socket", "/s.sock", "--preserve-fds", "2", "c2"},
			want: RuncCall{Root: "/r", LogFormat: "text", Command: "create", ContainerID: "c2", Bundle: "/b", PreserveFDs: 2},
		},
		{
			args: []string{"run", "-d", "--bundle=/b", "c3"},
			want: RuncCall{Root: DefaultRuncRoot, LogFormat: "text", Command: "run", ContainerID: "c3", Bundle: "/b", Detach: true},
		},
		{
			args: []string{"--root", "/r", "delete", "--force", "c4"},
			want: RuncCall{Root: "/r", LogFormat: "text", Command: "delete", ContainerID: "c4"},
		},
		{
			args: []string{"--root", "/r", "kill", "--all", "c5", "9"},
			want: RuncCall{Root: "/r", LogFormat: "text", Command: "kill", ContainerID: "c5"},
		},
		{
			args: []string{"--version"},
			want: RuncCall{Root: DefaultRuncRoot, LogFormat: "text"},
		},
	} {
		got, err := ParseRuncArgs(tc.args)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if !reflect.DeepEqual(*got, tc.want) {
			t.Errorf("%v:\n got %+v\nwant %+v", tc.args, *got, tc.want)
		}
	}
	if _, err := ParseRuncArgs([]string{"--root"}); err == nil {
		t.Error("--root without value: want error")
	}
	if _, err := ParseRuncArgs([]string{"create", "--preserve-fds", "x", "c"}); err == nil {
		t.Error("bad --preserve-fds: want error")
	}
}
