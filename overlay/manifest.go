package overlay

// EntryType is the kind of filesystem object an Entry records.
type EntryType string

// Entry types, as found in the upper dir (raw, before OCI translation).
const (
	TypeFile    EntryType = "file"
	TypeDir     EntryType = "dir"
	TypeSymlink EntryType = "symlink"
	TypeFifo    EntryType = "fifo"
	TypeChar    EntryType = "char" // a char device; 0:0 is an overlay whiteout
	TypeBlock   EntryType = "block"
	TypeSocket  EntryType = "socket" // recorded, never put in a layer
)

// Entry is one object of the upper dir at the captured instant.
type Entry struct {
	// Path is relative to the upper dir, slash-separated, without leading "./" ("etc/passwd").
	Path string    `json:"path"`
	Type EntryType `json:"type"`
	// Mode holds the permission bits plus setuid/setgid/sticky (fs.FileMode.Perm()|ModeSetuid...), as unix mode bits (e.g. 04755).
	Mode    uint32 `json:"mode"`
	UID     int    `json:"uid"`
	GID     int    `json:"gid"`
	Size    int64  `json:"size,omitempty"`
	MtimeNS int64  `json:"mtime_ns"`
	// Xattrs are all extended attributes, raw (trusted.overlay.* included; translation filters).
	Xattrs map[string][]byte `json:"xattrs,omitempty"`
	// Link is a symlink's target, read with readlinkat.
	Link string `json:"link,omitempty"`
	// RdevMajor and RdevMinor are a device node's numbers.
	RdevMajor uint32 `json:"rdev_major,omitempty"`
	RdevMinor uint32 `json:"rdev_minor,omitempty"`
	// Nlink and Inode identify hardlinks: regular files with Nlink > 1 sharing Inode.
	Nlink uint32 `json:"nlink,omitempty"`
	Inode uint64 `json:"inode,omitempty"`
	// Data names the file under the snapshot's data/ dir holding a regular file's content
	// (empty for an empty file; hardlinked names share one data file).
	Data string `json:"data,omitempty"`
}

// Manifest is the point-in-time metadata of a whole capture, entries sorted by Path.
type Manifest struct {
	Version int     `json:"version"`
	Upper   string  `json:"upper"`
	Entries []Entry `json:"entries"`
	// UserXattr records that the overlay kept its metadata in "user.overlay.*"
	// (mount option userxattr) rather than "trusted.overlay.*"; translation
	// honours only the active prefix (both are dropped from layers).
	UserXattr bool `json:"userxattr,omitempty"`
}

// ManifestVersion is the current Manifest.Version.
const ManifestVersion = 1
