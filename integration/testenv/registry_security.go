package testenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// prepareSecurity writes the certificate and htpasswd file the options ask
// for and sets up the harness's own client to use them.
func (r *Registry) prepareSecurity() error {
	if len(r.opts.Htpasswd) > 0 {
		if err := writeHtpasswd(filepath.Join(r.Dir, "htpasswd"), r.opts.Htpasswd); err != nil {
			return err
		}
	}
	if !r.opts.TLS {
		return nil
	}
	r.Scheme = "https"
	r.CertPath = filepath.Join(r.Dir, "cert.pem")
	certPEM, err := writeSelfSigned(r.CertPath, filepath.Join(r.Dir, "key.pem"))
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(certPEM)
	r.client.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	return nil
}

// securityConfig is the config.yml part for TLS and htpasswd auth.
func (r *Registry) securityConfig() string {
	var b strings.Builder
	if r.opts.TLS {
		fmt.Fprintf(&b, "  tls:\n    certificate: %s\n    key: %s\n", r.CertPath, filepath.Join(r.Dir, "key.pem"))
	}
	if len(r.opts.Htpasswd) > 0 {
		fmt.Fprintf(&b, "auth:\n  htpasswd:\n    realm: seamless-test\n    path: %s\n", filepath.Join(r.Dir, "htpasswd"))
	}
	return b.String()
}

// authorize adds the first htpasswd user's credentials to the harness's
// own requests.
func (r *Registry) authorize(req *http.Request) {
	if len(r.opts.Htpasswd) == 0 {
		return
	}
	users := make([]string, 0, len(r.opts.Htpasswd))
	for u := range r.opts.Htpasswd {
		users = append(users, u)
	}
	slices.Sort(users)
	req.SetBasicAuth(users[0], r.opts.Htpasswd[users[0]])
}

// writeHtpasswd writes users (name → password) as bcrypt htpasswd lines.
func writeHtpasswd(path string, users map[string]string) error {
	var b strings.Builder
	for name, password := range users {
		if name == "" || strings.ContainsAny(name, ":\n") {
			return fmt.Errorf("htpasswd: invalid user name %q", name)
		}
		hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
		if err != nil {
			return fmt.Errorf("htpasswd: %w", err)
		}
		fmt.Fprintf(&b, "%s:%s\n", name, hash)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("write htpasswd: %w", err)
	}
	return nil
}

// writeSelfSigned writes a self-signed CA certificate for 127.0.0.1, ::1
// and localhost and its key, and returns the certificate PEM.
func writeSelfSigned(certPath, keyPath string) ([]byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, fmt.Errorf("serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "seamless test registry"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create certificate: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode key: %w", err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := os.WriteFile(certPath, certPEM, 0o644); err != nil {
		return nil, fmt.Errorf("write certificate: %w", err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return nil, fmt.Errorf("write key: %w", err)
	}
	return certPEM, nil
}
