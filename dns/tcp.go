package dns

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"time"

	"github.com/tpgw/tpgw/internal/tsock"
)

// TCP timeouts: an idle connection (no next query) is closed after
// tcpIdleTimeout (RFC 7766 suggests tens of seconds; clients reconnect
// cheaply), a reply that cannot be written within tcpWriteTimeout is dropped.
const (
	tcpIdleTimeout  = 10 * time.Second
	tcpWriteTimeout = 5 * time.Second
)

// serveTCP accepts until the listener is closed. Accepted TPROXYed
// connections carry the original destination as their local address, so
// replies need nothing special.
func (s *Server) serveTCP() error {
	var backoff tsock.AcceptBackoff
	for {
		c, err := s.tcp.Accept()
		if err != nil {
			if s.isClosed() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() ||
				errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
				errors.Is(err, syscall.ECONNABORTED) {
				if warn, n := backoff.Failed(); warn {
					s.log.Warn("tcp accept", "err", err, "failed_accepts", n)
				}
				continue
			}
			return err
		}
		backoff.Succeeded()
		if !s.trackConn(c) {
			c.Close()
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.untrackConn(c)
			s.serveConn(c)
		}()
	}
}

// trackConn registers c, or refuses it when closed or at maxTCPConns.
func (s *Server) trackConn(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || len(s.conns) >= maxTCPConns {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrackConn(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.Close()
}

// serveConn answers length-prefixed queries on c, one after another, until
// the client closes, goes idle, or sends something malformed (a zero length
// or garbage: the framing can no longer be trusted, so the connection ends).
func (s *Server) serveConn(c net.Conn) {
	var lenBuf [2]byte
	// The accepted socket's local address is the query's original
	// destination (the kernel diverted it without rewriting it).
	var origDst netip.AddrPort
	if a, ok := c.LocalAddr().(*net.TCPAddr); ok {
		origDst = a.AddrPort()
	}
	for {
		if err := c.SetReadDeadline(time.Now().Add(tcpIdleTimeout)); err != nil {
			return
		}
		if _, err := io.ReadFull(c, lenBuf[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint16(lenBuf[:])
		if n == 0 {
			s.malformed.Add(1)
			return
		}
		req := make([]byte, n)
		if _, err := io.ReadFull(c, req); err != nil {
			return
		}
		if !s.acquire() {
			return
		}
		reply := s.answer(req, false, origDst)
		s.release()
		if reply == nil {
			return
		}
		out := make([]byte, 2+len(reply))
		binary.BigEndian.PutUint16(out, uint16(len(reply)))
		copy(out[2:], reply)
		if err := c.SetWriteDeadline(time.Now().Add(tcpWriteTimeout)); err != nil {
			return
		}
		if _, err := c.Write(out); err != nil {
			return
		}
	}
}
