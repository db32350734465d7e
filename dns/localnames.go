package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"time"

	D "github.com/miekg/dns"
	"golang.org/x/sys/unix"
)

// Names only the LAN knows (the router's "openwrt.lan", a NAS's single-label
// name, reverse lookups of LAN addresses) mean nothing to mihomo's
// nameservers. Faked, such a name gets a fake IP that mihomo cannot resolve
// when the connection comes, so the router's web page by name and every
// other local name stopped working behind the hijack, and reverse lookups of
// LAN clients came back empty. With ForwardLocalNames, a hijacked query for
// such a name goes to the server the client asked (the router's dnsmasq,
// usually the gateway itself), as it would without tpgw, and its answer is
// passed back unchanged. A name in mihomo's hosts stays mihomo's.

// localSuffixes are the domains for names of the local network: .lan
// (OpenWrt's and many routers' default), .local (mDNS; some LAN servers
// answer it too), .localdomain, RFC 8375's home.arpa, and .internal
// (reserved by ICANN for private use in 2024). RFC 6762's other suggestions
// (.corp, .home, .private, .intranet) are also in use as company domains
// that mihomo rules may send to a proxy, and are left to mihomo.
var localSuffixes = []string{"lan.", "local.", "localdomain.", "home.arpa.", "internal."}

// localReverse are the reverse zones of the LAN's address ranges: 10/8,
// 172.16/12, 192.168/16, 169.254/16, fc00::/7 and fe80::/10. (The fake-ip
// range's reverse names stay mihomo's: it maps them back to the name.)
var localReverse = func() []string {
	z := []string{"10.in-addr.arpa.", "168.192.in-addr.arpa.", "254.169.in-addr.arpa.",
		"c.f.ip6.arpa.", "d.f.ip6.arpa.", "8.e.f.ip6.arpa.", "9.e.f.ip6.arpa.", "a.e.f.ip6.arpa.", "b.e.f.ip6.arpa."}
	for i := 16; i < 32; i++ {
		z = append(z, fmt.Sprintf("%d.172.in-addr.arpa.", i))
	}
	return z
}()

// IsLocalName reports whether name is one of the local network's, which
// ForwardLocalNames passes to the server asked: a single label, or under
// localSuffixes or localReverse.
func IsLocalName(name string) bool { return isLocalName(name) }

func isLocalName(name string) bool {
	name = strings.ToLower(D.Fqdn(name))
	if name == "." {
		return false
	}
	// Every query the reply cache cannot answer comes here: plain string
	// tests, as a label-wise comparison costs a microsecond per zone. A
	// name with escapes (a dot inside a label) is compared by labels.
	under, labels := inZone, strings.Count(name, ".")
	if strings.IndexByte(name, '\\') >= 0 {
		under, labels = D.IsSubDomain, D.CountLabel(name)
	}
	if labels == 1 {
		return true
	}
	for _, zones := range [][]string{localSuffixes, localReverse} {
		for _, z := range zones {
			if under(z, name) {
				return true
			}
		}
	}
	return false
}

// inZone reports whether the FQDN name, without escapes, is zone or under
// it.
func inZone(zone, name string) bool {
	return name == zone || len(name) > len(zone) && strings.HasSuffix(name, zone) && name[len(name)-len(zone)-1] == '.'
}

// localForward is the state of ForwardLocalNames.
type localForward struct {
	mark    uint32                 // SO_MARK of the forwarding sockets (the engine's routing-mark)
	inHosts func(name string) bool // names mihomo's hosts answer
}

// ForwardLocalNames makes hijacked queries for local names (isLocalName)
// go to the server the client asked, from a socket carrying mark (mihomo's
// routing-mark, so that proxy-self does not divert them back; 0: none),
// unless inHosts (mihomo's hosts) has the name. Call it before Serve.
func (s *Server) ForwardLocalNames(mark uint32, inHosts func(name string) bool) {
	if inHosts == nil {
		inHosts = func(string) bool { return false }
	}
	s.local = &localForward{mark: mark, inHosts: inHosts}
}

// forwardTimeout bounds the exchange with the server the client asked:
// less than a stub resolver's usual 5 s, so that a silent server gets the
// client a SERVFAIL rather than its own timeout.
const forwardTimeout = 3 * time.Second

// localTarget returns where to forward a query for the local name, or an
// invalid AddrPort when the engine answers it. origDst is the query's
// original destination: a query the kernel diverted keeps port 53. One sent
// to this listener itself is not forwarded: that would send it back here
// (the forward's mark exempts it from the hijack, not from the listener),
// again and again, each hop holding a query slot for forwardTimeout. That
// is the case of dns.listen on port 53 (allowed without fake-ip) asked at
// one of the gateway's own addresses.
func (s *Server) localTarget(name string, origDst netip.AddrPort) netip.AddrPort {
	if !origDst.IsValid() || origDst.Port() != 53 || s.local.inHosts(strings.TrimSuffix(strings.ToLower(name), ".")) {
		return netip.AddrPort{}
	}
	dst := netip.AddrPortFrom(origDst.Addr().Unmap(), origDst.Port())
	if dst.Port() == s.addr.Port() {
		listen := s.addr.Addr().Unmap()
		if dst.Addr() == listen || (listen.IsUnspecified() && s.isLocal(dst.Addr())) {
			return netip.AddrPort{}
		}
	}
	return dst
}

// isLocal reports whether a is an address of this host, as the reply
// sockets last saw it.
func (s *Server) isLocal(a netip.Addr) bool {
	if s.replies == nil {
		return isLocalAddr(a)
	}
	return s.replies.localAddr(a)
}

// forward sends req to server over UDP or TCP and returns its answer,
// unchanged. A UDP answer with another ID or from elsewhere is ignored.
// size is the largest UDP answer the client takes (its EDNS0 buffer, at
// least 512 bytes): a server answers within it, and a larger buffer would be
// held for nothing while the server takes its time.
func (s *Server) forward(ctx context.Context, req []byte, server netip.AddrPort, udp bool, size int) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, forwardTimeout)
	defer cancel()
	d := net.Dialer{}
	if s.local.mark != 0 {
		d.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(s.local.mark))
			}); err != nil {
				return err
			}
			return serr
		}
	}
	network := "tcp"
	if udp {
		network = "udp"
	}
	var conn net.Conn
	if err := s.replies.ns.Do(func() (err error) {
		conn, err = d.DialContext(ctx, network, server.String())
		return err
	}); err != nil {
		return nil, err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if !udp {
		out := make([]byte, 2+len(req))
		binary.BigEndian.PutUint16(out, uint16(len(req)))
		copy(out[2:], req)
		if _, err := conn.Write(out); err != nil {
			return nil, err
		}
		var l [2]byte
		if _, err := io.ReadFull(conn, l[:]); err != nil {
			return nil, err
		}
		resp := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(conn, resp); err != nil {
			return nil, err
		}
		return checkAnswer(req, resp)
	}
	if _, err := conn.Write(req); err != nil {
		return nil, err
	}
	buf := make([]byte, max(size, 512))
	for {
		n, err := conn.Read(buf) // a connected socket: only the server's datagrams
		if err != nil {
			return nil, err
		}
		if resp, err := checkAnswer(req, buf[:n]); err == nil {
			return resp, nil
		}
	}
}

// checkAnswer returns resp if it answers req (same ID, QR set).
func checkAnswer(req, resp []byte) ([]byte, error) {
	if len(resp) < headerLen || resp[0] != req[0] || resp[1] != req[1] || resp[2]&0x80 == 0 {
		return nil, errors.New("not an answer to the query")
	}
	return resp, nil
}

// routeLocal is the route of ForwardLocalNames: a local name asked of a
// server the kernel diverted to tpgw goes to that server; answers for local
// names are not cached (the next query may have been sent to another
// server).
func (s *Server) routeLocal(ctx context.Context, q *D.Msg, req []byte, udp bool, origDst netip.AddrPort) ([]byte, bool, bool) {
	if len(q.Question) != 1 || !isLocalName(q.Question[0].Name) {
		return nil, false, true
	}
	server := s.localTarget(q.Question[0].Name, origDst)
	if !server.IsValid() {
		return nil, false, false
	}
	size := 512
	if opt := q.IsEdns0(); opt != nil {
		size = int(opt.UDPSize())
	}
	resp, err := s.forward(ctx, req, server, udp, size)
	if err != nil {
		s.log.Debug("local name: the server the client asked did not answer", "name", q.Question[0].Name, "server", server, "err", err)
		return nil, true, false
	}
	return resp, true, false
}
