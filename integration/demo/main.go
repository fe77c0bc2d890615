// Command demo runs seamless end to end on this machine: an isolated
// containerd and a local registry, a busybox container run through
// seamless-runc, a few changes inside it, a snapshot, and a new container
// started from the pushed image. Everything it starts is removed at exit.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/seamless-snapshot/seamless/config"
	"github.com/seamless-snapshot/seamless/integration/testenv"
)

const (
	imageName = "localhost/busybox:1.0"
	// cgroupParent groups the demo's containers so demo-clean can find them.
	cgroupParent = "/seamless-demo"
)

func main() {
	bin := flag.String("bin", "bin", "directory holding the seamless and seamless-runc binaries")
	dir := flag.String("dir", "/tmp/seamless-demo", "working directory (containerd, registry, snapshots)")
	clean := flag.Bool("clean", false, "only remove what an interrupted demo left behind, then exit")
	flag.Parse()
	if *clean {
		if err := cleanLeftovers(*dir); err != nil {
			fmt.Fprintln(os.Stderr, "demo-clean:", err)
			os.Exit(1)
		}
		fmt.Println("demo leftovers removed")
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *bin, *dir); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

type demo struct {
	bin  string
	dirs config.Dirs
	ctd  *testenv.Containerd
	reg  *testenv.Registry
}

func run(ctx context.Context, bin, dir string) (err error) {
	if err := testenv.Prereqs(); err != nil {
		return fmt.Errorf("%w (run 'make deps' as root)", err)
	}
	bin, err = filepath.Abs(bin)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	d := &demo{bin: bin, dirs: config.Dirs{State: filepath.Join(dir, "state"), Run: filepath.Join(dir, "run")}}
	defer func() {
		step("cleaning up")
		if cerr := d.close(dir); cerr != nil {
			err = fmt.Errorf("%v; clean-up: %w", err, cerr)
		}
	}()

	step("starting an isolated containerd and a registry on 127.0.0.1")
	d.ctd, err = testenv.StartContainerd(ctx, testenv.ContainerdOptions{Dir: dir, Env: []string{
		config.EnvStateDir + "=" + d.dirs.State, config.EnvRunDir + "=" + d.dirs.Run,
	}})
	if err != nil {
		return err
	}
	d.reg, err = testenv.StartRegistry(ctx, testenv.RegistryOptions{Dir: dir})
	if err != nil {
		return err
	}
	fmt.Printf("  containerd %s\n  registry   http://%s\n", d.ctd.Address, d.reg.Host)

	step("building a busybox base image locally and importing it (" + imageName + ")")
	img, err := testenv.BuildImage(ctx, dir, imageName, nil)
	if err != nil {
		return err
	}
	if err := d.ctd.ImportImage(ctx, img.Archive); err != nil {
		return err
	}

	id := fmt.Sprintf("demo%x", time.Now().UnixNano()&0xffffffff)
	step("running container " + id + " through seamless-runc")
	err = d.ctd.Run(ctx, testenv.RunOptions{
		ID: id, Image: imageName, RuncBinary: filepath.Join(bin, "seamless-runc"),
		Cgroup: cgroupParent + "/" + id,
		Args:   []string{"sh", "-c", "trap 'exit 0' TERM; i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done"},
	})
	if err != nil {
		return err
	}
	if err := d.cli(ctx, "list"); err != nil {
		return err
	}

	step("changing files inside the running container")
	script := `set -e
echo "work in progress" > /root/notes.txt
echo "extra line" >> /etc/motd
rm /data/imgfile.txt
dd if=/dev/urandom of=/root/blob bs=1M count=20 2>/dev/null
ls -l /root`
	out, err := d.ctd.Exec(ctx, id, "sh", "-c", script)
	fmt.Print(indent(string(out)))
	if err != nil {
		return err
	}

	target := d.reg.Host + "/demo/snap:1"
	prefix := id[:6]
	step(fmt.Sprintf("seamless snapshot --container %s --target %s --plain-http --wait", prefix, target))
	if err := d.cli(ctx, "snapshot", "--container", prefix, "--target", target, "--plain-http", "--wait"); err != nil {
		return err
	}
	if err := d.cli(ctx, "status"); err != nil {
		return err
	}

	step("pulling " + target + " and running a new container from it")
	if err := d.ctd.Pull(ctx, target, true); err != nil {
		return err
	}
	out, err = d.ctd.Ctr(ctx, "run", "--rm", "--runc-root", d.ctd.RuncRoot, "--fifo-dir", d.ctd.FifoDir,
		"--cgroup", cgroupParent+"/"+id+"-check", target, id+"-check", "sh", "-c",
		`echo "/root/notes.txt: $(cat /root/notes.txt)"; echo "/etc/motd last line: $(tail -n1 /etc/motd)";
		 if [ -e /data/imgfile.txt ]; then echo "/data/imgfile.txt: present (WRONG)"; else echo "/data/imgfile.txt: deleted"; fi
		 echo "/root/blob: $(wc -c < /root/blob) bytes"; echo "/tmp/counter at the snapshot: $(cat /tmp/counter)"`)
	fmt.Print(indent(string(out)))
	if err != nil {
		return err
	}
	if err := d.ctd.Remove(ctx, id); err != nil {
		return err
	}
	step("done: the container kept running while its filesystem was captured in the pause above")
	return nil
}

// cli runs the seamless CLI with the demo's directories, output to the terminal.
func (d *demo) cli(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, filepath.Join(d.bin, "seamless"), args...)
	cmd.Env = append(os.Environ(), config.EnvStateDir+"="+d.dirs.State, config.EnvRunDir+"="+d.dirs.Run)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("seamless %s: %w", strings.Join(args, " "), err)
	}
	return nil
}

func (d *demo) close(dir string) error {
	var errs []string
	if d.ctd != nil {
		if err := d.ctd.Close(); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if d.reg != nil {
		if err := d.reg.Close(); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if err := cleanLeftovers(dir); err != nil {
		errs = append(errs, err.Error())
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

// cleanLeftovers stops processes whose command line or binary lives under
// dir (containerd, registry, their shims, seamless shims and uploaders), by
// PID, unmounts what is mounted under dir, removes the demo's cgroups and dir.
func cleanLeftovers(dir string) error {
	dir = filepath.Clean(dir)
	for _, pid := range processesUsing(dir) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	mounts, _ := testenv.MountsUnder(dir)
	for i := len(mounts) - 1; i >= 0; i-- {
		if err := syscall.Unmount(mounts[i], 0); err != nil {
			syscall.Unmount(mounts[i], syscall.MNT_DETACH)
		}
	}
	if err := testenv.ThawCgroups(cgroupParent); err != nil {
		return err
	}
	removeCgroups(cgroupParent)
	return os.RemoveAll(dir)
}

// processesUsing lists processes whose command line mentions dir.
func processesUsing(dir string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), dir+"/") {
			pids = append(pids, pid)
		}
	}
	return pids
}

// removeCgroups removes the demo's cgroup dirs (children first) in every hierarchy.
func removeCgroups(parent string) {
	roots, _ := filepath.Glob("/sys/fs/cgroup/*")
	roots = append(roots, "/sys/fs/cgroup")
	for _, root := range roots {
		top := filepath.Join(root, parent)
		children, _ := filepath.Glob(filepath.Join(top, "*"))
		for _, c := range children {
			if fi, err := os.Stat(c); err == nil && fi.IsDir() {
				os.Remove(c)
			}
		}
		os.Remove(top)
	}
}

func step(msg string) { fmt.Printf("\n==> %s\n", msg) }

func indent(s string) string {
	if s == "" {
		return ""
	}
	return "  " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n  ") + "\n"
}
