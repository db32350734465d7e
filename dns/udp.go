package dns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/tsock"
)

// serveUDP reads queries until the socket is closed. One goroutine reads,
// a burst at a time (recvmmsg): repeated queries are answered from the
// reply cache right there; the others are answered each on its own
// goroutine, at most maxInFlight at once.
func (s *Server) serveUDP() error {
	br, err := tsock.NewBatchReader(s.udp, udpBatch, maxUDPQuery, 128)
	if err != nil {
		return fmt.Errorf("dns: udp: %w", err)
	}
	scratch := make([]byte, 0, maxCachedReply) // cache hits are sent from it, synchronously
	for {
		msgs, err := br.Read()
		if err != nil {
			if s.isClosed() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Transient (e.g. ENOBUFS, ENOMEM): do not spin on it.
			s.log.Debug("udp read", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		for _, m := range msgs {
			if !s.serveDatagram(m.Data, m.OOB, m.Src, scratch) {
				return nil
			}
		}
	}
}

// udpBatch is how many datagrams one read takes at most.
const udpBatch = 32

// maxUDPQuery is the read buffer per datagram: a query (one question,
// perhaps EDNS0 options) is far smaller; a longer datagram is cut, fails to
// unpack and is dropped as garbage.
const maxUDPQuery = 4096

// serveDatagram answers one query datagram (from the cache, built in
// scratch and sent before it returns, or on a new goroutine); false once the
// server is closing.
func (s *Server) serveDatagram(data, oob []byte, client netip.AddrPort, scratch []byte) bool {
	origDst, _ := tsock.ParseOrigDst(oob) // invalid when none
	if reply := s.cache.appendReply(scratch[:0], data, true); reply != nil {
		s.queries.Add(1)
		if err := s.replyUDP(reply, client, origDst); err != nil {
			s.log.Debug("udp reply", "client", client, "from", origDst, "err", err)
		}
		return true
	}
	if !s.acquire() {
		return false
	}
	req := make([]byte, len(data))
	copy(req, data)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer s.release()
		if reply := s.answer(req, true); reply != nil {
			if err := s.replyUDP(reply, client, origDst); err != nil {
				s.log.Debug("udp reply", "client", client, "from", origDst, "err", err)
			}
		}
	}()
	return true
}

// replyUDP sends reply to client so that it comes from origDst, the address
// the client sent its query to. A TPROXYed query (say to 203.0.113.2:53)
// arrived on our port with its destination unchanged; a client drops a reply
// from any other address or port, so the reply leaves from a transparent
// socket bound to origDst. A query sent to this server's own port is
// answered from the listening socket, with origDst as source address.
func (s *Server) replyUDP(reply []byte, client, origDst netip.AddrPort) error {
	if !origDst.IsValid() {
		_, err := s.udp.WriteToUDPAddrPort(reply, client)
		return err
	}
	if origDst.Port() == s.addr.Port() {
		_, _, err := s.udp.WriteMsgUDPAddrPort(reply, sourceCmsg(origDst.Addr()), client)
		return err
	}
	if !s.transparent {
		// Cannot happen without tproxy, which needs a transparent socket.
		return fmt.Errorf("query to %v on a non-transparent socket", origDst)
	}
	return s.replies.send(reply, client, origDst)
}

// sourceCmsg is the control message that makes a reply sent on the listening
// socket leave from src (IP_PKTINFO / IPV6_PKTINFO). On a transparent socket
// src need not be local.
func sourceCmsg(src netip.Addr) []byte {
	if src.Is4() {
		return unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: src.As4()})
	}
	return unix.PktInfo6(&unix.Inet6Pktinfo{Addr: src.As16()})
}
