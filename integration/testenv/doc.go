// Package testenv starts real, isolated infrastructure for integration tests
// and demos: a containerd (with the runc v2 shim), a local OCI registry, and a
// busybox base image built without network access.
//
// Everything a value starts is tracked by PID, directory or cgroup path and
// torn down by its Close method, which is safe to call more than once and
// never touches anything another instance (or the host) created. The *T
// helpers wrap the constructors for tests: they register Close with
// t.Cleanup and fail the test on error.
//
// All of it needs root, runc, containerd 1.6 (+ctr, containerd-shim-runc-v2),
// docker-registry and busybox-static; see Prereqs.
package testenv
