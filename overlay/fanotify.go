package overlay

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// trackFlags and trackMask configure the dirty-tracking fanotify group: FID
// reporting (parent dir handle + name, and the object's handle), an unlimited
// queue, non-blocking reads. A filesystem mark on the upper's filesystem sees
// everything overlayfs does to the upper dir (copy-ups, whiteouts, opaque
// dirs); a mount mark would see nothing (overlay writes through a private
// clone mount).
const (
	trackFlags = unix.FAN_CLASS_NOTIF | unix.FAN_REPORT_DFID_NAME | unix.FAN_REPORT_FID |
		unix.FAN_UNLIMITED_QUEUE | unix.FAN_NONBLOCK | unix.FAN_CLOEXEC
	trackMask = unix.FAN_MODIFY | unix.FAN_ATTRIB | unix.FAN_CREATE | unix.FAN_DELETE |
		unix.FAN_MOVED_FROM | unix.FAN_MOVED_TO | unix.FAN_DELETE_SELF | unix.FAN_MOVE_SELF |
		unix.FAN_CLOSE_WRITE | unix.FAN_ONDIR
)

// Sizes of the fanotify records parsed here (linux/fanotify.h).
const (
	eventMetadataLen = unix.FAN_EVENT_METADATA_LEN // struct fanotify_event_metadata
	infoHeaderLen    = 4                           // struct fanotify_event_info_header
	fsidLen          = 8                           // __kernel_fsid_t
	fileHandleHdrLen = 8                           // struct file_handle without f_handle
)

// newFanotifyGroup creates the tracking group and marks the filesystem of the
// directory dirfd. On error nothing is left open.
func newFanotifyGroup(dirfd int) (int, error) {
	fd, err := unix.FanotifyInit(trackFlags, unix.O_RDONLY|unix.O_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("fanotify_init: %w", err)
	}
	if err := unix.FanotifyMark(fd, unix.FAN_MARK_ADD|unix.FAN_MARK_FILESYSTEM, trackMask, dirfd, ""); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("fanotify_mark (filesystem of the upper dir): %w", err)
	}
	return fd, nil
}

// fanEvent is the part of one fanotify event dirty tracking uses.
type fanEvent struct {
	mask uint64
	pid  int32
	// dirHandle is the parent directory's handle (type + bytes) from the
	// DFID_NAME (or DFID) record, empty when the event has none (FID-only).
	dirHandle string
	// name is the entry's name in that directory; "." for an event on the
	// directory itself.
	name string
}

// errBadEvent reports a fanotify buffer that cannot be parsed.
var errBadEvent = errors.New("malformed fanotify event")

// parseEvents calls fn for every event in buf (as returned by read(2) on a
// fanotify fd). Events without a directory record are passed with an empty
// dirHandle.
func parseEvents(buf []byte, fn func(*fanEvent)) error {
	var ev fanEvent
	for len(buf) > 0 {
		if len(buf) < eventMetadataLen {
			return fmt.Errorf("%w: %d trailing bytes", errBadEvent, len(buf))
		}
		evLen := int(binary.NativeEndian.Uint32(buf[0:4]))
		vers := buf[4]
		metaLen := int(binary.NativeEndian.Uint16(buf[6:8]))
		if vers != unix.FANOTIFY_METADATA_VERSION {
			return fmt.Errorf("%w: metadata version %d, want %d", errBadEvent, vers, unix.FANOTIFY_METADATA_VERSION)
		}
		if evLen < eventMetadataLen || evLen > len(buf) || metaLen < eventMetadataLen || metaLen > evLen {
			return fmt.Errorf("%w: event length %d, metadata length %d, %d bytes left", errBadEvent, evLen, metaLen, len(buf))
		}
		ev = fanEvent{
			mask: binary.NativeEndian.Uint64(buf[8:16]),
			pid:  int32(binary.NativeEndian.Uint32(buf[20:24])),
		}
		if fd := int32(binary.NativeEndian.Uint32(buf[16:20])); fd >= 0 {
			unix.Close(int(fd)) // never expected in FID mode; do not leak it
		}
		if err := parseInfo(buf[metaLen:evLen], &ev); err != nil {
			return err
		}
		fn(&ev)
		buf = buf[evLen:]
	}
	return nil
}

// parseInfo fills ev's directory handle and name from the info records.
func parseInfo(info []byte, ev *fanEvent) error {
	for len(info) > 0 {
		if len(info) < infoHeaderLen {
			return fmt.Errorf("%w: short info header", errBadEvent)
		}
		typ := info[0]
		n := int(binary.NativeEndian.Uint16(info[2:4]))
		if n < infoHeaderLen || n > len(info) {
			return fmt.Errorf("%w: info record length %d of %d", errBadEvent, n, len(info))
		}
		rec := info[infoHeaderLen:n]
		info = info[n:]
		switch typ {
		case unix.FAN_EVENT_INFO_TYPE_DFID_NAME, unix.FAN_EVENT_INFO_TYPE_DFID:
			handle, rest, err := parseFid(rec)
			if err != nil {
				return err
			}
			ev.dirHandle, ev.name = handle, "."
			if typ == unix.FAN_EVENT_INFO_TYPE_DFID_NAME {
				ev.name = cString(rest)
			}
		}
	}
	return nil
}

// parseFid splits an FID info record body (fsid, struct file_handle, rest)
// and returns the handle as type+bytes, plus what follows it.
func parseFid(rec []byte) (handle string, rest []byte, err error) {
	if len(rec) < fsidLen+fileHandleHdrLen {
		return "", nil, fmt.Errorf("%w: short fid record", errBadEvent)
	}
	h := rec[fsidLen:]
	size := int(binary.NativeEndian.Uint32(h[0:4]))
	if size > len(h)-fileHandleHdrLen {
		return "", nil, fmt.Errorf("%w: handle of %d bytes in a %d-byte record", errBadEvent, size, len(rec))
	}
	end := fileHandleHdrLen + size
	return string(h[4:end]), h[end:], nil
}

// cString returns b up to its first NUL.
func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// fileHandle turns a handle key from parseFid back into a FileHandle.
func fileHandle(key string) (unix.FileHandle, error) {
	if len(key) < 4 {
		return unix.FileHandle{}, fmt.Errorf("%w: handle key of %d bytes", errBadEvent, len(key))
	}
	typ := int32(binary.NativeEndian.Uint32([]byte(key[:4])))
	return unix.NewFileHandle(typ, []byte(key[4:])), nil
}
