package freezer

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"
)

// Task is a thread of the cgroup that kept a freeze from completing.
type Task struct {
	TID  int
	Comm string
	// State is the /proc state letter while the freeze waited: D
	// (uninterruptible sleep) or R (not scheduled in time).
	State string
	// Wchan is the kernel function the task waited in while the freeze was
	// pending.
	Wchan string
}

func (t Task) String() string {
	return fmt.Sprintf("%d %s (state %s, wchan %s)", t.TID, t.Comm, t.State, t.Wchan)
}

// TimeoutError is a freeze that did not complete before its deadline. The
// cgroup was thawed before it was returned.
type TimeoutError struct {
	Kind   Kind
	Dir    string
	Waited time.Duration
	// Tasks are the threads that were not frozen (at most maxReported).
	Tasks []Task
}

func (e *TimeoutError) Error() string {
	what := "no unfrozen task found"
	if len(e.Tasks) > 0 {
		names := make([]string, len(e.Tasks))
		for i, t := range e.Tasks {
			names[i] = t.String()
		}
		what = "tasks not frozen: " + strings.Join(names, ", ")
	}
	return fmt.Sprintf("freeze %s (%s): not frozen after %v, thawed; %s",
		e.Dir, e.Kind, e.Waited.Round(time.Microsecond), what)
}

// maxReported bounds the tasks a TimeoutError lists.
const maxReported = 16

// inFreezerTrap reports whether wchan is where a task frozen by the freezer
// sleeps: v1 __refrigerator, v2 do_freezer_trap (inlined into get_signal).
func inFreezerTrap(wchan string) bool {
	switch wchan {
	case "__refrigerator", "do_freezer_trap", "get_signal":
		return true
	}
	return false
}

// unfrozenTasks lists the threads of the cgroup tree at dir that are not
// sleeping in a freezer trap. Call it before thawing; blockers then narrows
// the list once the cgroup is thawed.
func (f *Freezer) unfrozenTasks() []Task {
	var out []Task
	tids, _ := f.threads() // best effort: this only names the blockers
	for _, tid := range tids {
		wchan, err := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", tid))
		if err != nil || inFreezerTrap(string(wchan)) {
			continue
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", tid))
		if err != nil {
			continue
		}
		comm, state := procCommState(stat)
		out = append(out, Task{TID: tid, Comm: comm, State: state, Wchan: string(wchan)})
		if len(out) == 4*maxReported {
			break
		}
	}
	return out
}

// blockers narrows the candidates, once the cgroup is thawed, to those
// that are in uninterruptible sleep: v1 freezes sleeping tasks in place
// (state D with their own wchan, not __refrigerator) and the thaw puts them
// back to S or R, while a task that blocked the freeze stays D (v2's thaw
// wakes it for a moment, hence a second look 1 ms later). Without such a
// task, the ones still running are kept (a freeze can also fail for lack of
// CPU), and without those all candidates.
func blockers(candidates []Task) []Task {
	states := postThawStates(candidates)
	if slices.Contains(states, "R") {
		time.Sleep(time.Millisecond)
		for i, st := range postThawStates(candidates) {
			if st == "D" {
				states[i] = "D"
			}
		}
	}
	for _, want := range []string{"D", "R", ""} {
		var out []Task
		for i, t := range candidates {
			if states[i] != "gone" && (want == "" || states[i] == want) {
				out = append(out, t)
			}
		}
		if len(out) > 0 {
			return out[:min(len(out), maxReported)]
		}
	}
	return nil
}

// postThawStates reads the current state letter of each task ("gone" if it
// exited).
func postThawStates(tasks []Task) []string {
	states := make([]string, len(tasks))
	for i, t := range tasks {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", t.TID))
		if err != nil {
			states[i] = "gone"
			continue
		}
		_, states[i] = procCommState(stat)
	}
	return states
}

// threads lists the thread ids of the cgroup and its descendants.
func (f *Freezer) threads() ([]int, error) {
	file := "cgroup.threads"
	if f.kind == V1 {
		file = "tasks"
	}
	return f.procs.pids(file)
}

// procCommState extracts comm and the state letter from a /proc/<pid>/stat line.
func procCommState(stat []byte) (comm, state string) {
	open, end := bytes.IndexByte(stat, '('), bytes.LastIndexByte(stat, ')')
	if open < 0 || end < open || end+2 >= len(stat) {
		return "?", "?"
	}
	return string(stat[open+1 : end]), string(stat[end+2])
}
