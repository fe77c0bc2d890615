package shim

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshot/seamless/snapshot"
)

// maxRequestBody bounds a POST body.
const maxRequestBody = 64 << 10

func (s *Shim) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/snapshots", s.handleCreate)
	mux.HandleFunc("GET /v1/snapshots/{id}", s.handleGet)
	mux.HandleFunc("GET /v1/info", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.info())
	})
	mux.Handle("GET /metrics", newMetrics(s.store, s.cfg.ContainerID))
	return mux
}

// errorBody is the JSON of every error answer.
type errorBody struct {
	Error string          `json:"error"`
	State *snapshot.State `json:"state,omitempty"`
}

func (s *Shim) handleCreate(w http.ResponseWriter, r *http.Request) {
	var req snapshot.Request
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRequestBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeJSON(w, http.StatusBadRequest, errorBody{Error: "invalid request body: " + err.Error()})
		return
	}
	st, err := s.Snapshot(r.Context(), req)
	var reqErr *RequestError
	switch {
	case err == nil:
		writeJSON(w, http.StatusCreated, st)
	case errors.Is(err, ErrBusy):
		writeJSON(w, http.StatusConflict, errorBody{Error: err.Error()})
	case errors.As(err, &reqErr):
		writeJSON(w, http.StatusBadRequest, errorBody{Error: err.Error()})
	default:
		writeJSON(w, http.StatusInternalServerError, errorBody{Error: err.Error(), State: st})
	}
}

func (s *Shim) handleGet(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if !snapshot.ValidID(id) {
		writeJSON(w, http.StatusBadRequest, errorBody{Error: fmt.Sprintf("invalid snapshot id %q", id)})
		return
	}
	st, err := s.store.Load(id)
	if err != nil || st.Container != s.cfg.ContainerID {
		writeJSON(w, http.StatusNotFound, errorBody{Error: fmt.Sprintf("no snapshot %q of container %s", id, s.cfg.ContainerID)})
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := jsonIndent(v)
	if err != nil {
		code, b = http.StatusInternalServerError, []byte(`{"error":"encode answer"}`+"\n")
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	w.Write(b)
}

func jsonIndent(v any) ([]byte, error) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode json: %w", err)
	}
	return append(b, '\n'), nil
}

// peerCheckListener accepts only peers running as uid (SO_PEERCRED).
type peerCheckListener struct {
	net.Listener
	uid uint32
}

func (l *peerCheckListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if err := checkPeer(c, l.uid); err != nil {
			c.Close()
			continue
		}
		return c, nil
	}
}

func checkPeer(c net.Conn, uid uint32) error {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return errors.New("not a unix connection")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if credErr != nil {
		return credErr
	}
	if cred.Uid != 0 && cred.Uid != uid {
		return fmt.Errorf("peer uid %d refused", cred.Uid)
	}
	return nil
}
