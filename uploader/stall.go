package uploader

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
)

// envTestStall makes an uploader stop for good at one point of its work,
// so that tests can SIGKILL it there: "build:N" (after N uncompressed
// bytes), "spooled" (spool renamed, not yet recorded), "built" (spool
// recorded), "push:N" (after N bytes sent to the registry) or "pushed"
// (manifest pushed, state not yet done). Tests only.
const envTestStall = "_SEAMLESS_TEST_STALL"

// Stall points.
const (
	stallBuild   = "build"
	stallSpooled = "spooled"
	stallBuilt   = "built"
	stallPush    = "push"
	stallPushed  = "pushed"
)

// stallPoint is a parsed envTestStall; the zero value never stalls.
type stallPoint struct {
	point string
	bytes int64
	once  *sync.Once
}

// parseStall parses an envTestStall value ("" is no stall).
func parseStall(v string) (stallPoint, error) {
	if v == "" {
		return stallPoint{}, nil
	}
	p, n, hasN := strings.Cut(v, ":")
	s := stallPoint{point: p, once: new(sync.Once)}
	switch p {
	case stallBuild, stallPush:
		b, err := strconv.ParseInt(n, 10, 64)
		if !hasN || err != nil || b < 0 {
			return stallPoint{}, fmt.Errorf("%s=%q: want %s:BYTES", envTestStall, v, p)
		}
		s.bytes = b
	case stallSpooled, stallBuilt, stallPushed:
		if hasN {
			return stallPoint{}, fmt.Errorf("%s=%q: %s takes no byte count", envTestStall, v, p)
		}
	default:
		return stallPoint{}, fmt.Errorf("%s=%q: unknown point", envTestStall, v)
	}
	return s, nil
}

// stall blocks forever when the upload reaches its stall point (point,
// with n bytes done), after logging it and saving the state as it is.
func (u *upload) stall(point string, n int64) {
	s := u.opts.stall
	if s.point != point || n < s.bytes {
		return
	}
	s.once.Do(func() {
		u.state.flush()
		u.logf("test stall at %s (%d bytes)", point, n)
		for {
			time.Sleep(time.Hour) // a sleeping timer keeps the deadlock detector quiet
		}
	})
}
