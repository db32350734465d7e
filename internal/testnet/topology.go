package testnet

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tpgw/tpgw/internal/testenv"
)

// Interface names. The gateway's are part of the API (tpgw's `interfaces:`);
// the others are named for the neighbour they lead to.
const (
	LANIface = "lan0" // gateway, towards the client
	WANIface = "wan0" // gateway, towards the upstream
	// ClientIface, UpstreamIface and ProxyIface face the gateway (client,
	// upstream) and the upstream (proxy); UpstreamProxyIface faces the proxy.
	ClientIface        = "eth0"
	UpstreamIface      = "eth0"
	UpstreamProxyIface = "prx0"
	ProxyIface         = "eth0"
)

// Topology is one set of four namespaces wired as drawn in the package doc.
type Topology struct {
	Client, Gateway, Upstream, Proxy *NS

	// IPv4.
	ClientIP   netip.Addr // 192.168.77.2, client eth0
	GatewayLAN netip.Addr // 192.168.77.1, gateway lan0, the client's default gateway
	GatewayWAN netip.Addr // 203.0.113.1, gateway wan0: what the upstream sees for DIRECT
	UpstreamIP netip.Addr // 203.0.113.2, upstream eth0: HTTP, UDP echo, dnsmasq
	ProxyGW    netip.Addr // 198.51.100.1, upstream prx0, the proxy's default gateway
	ProxyIP    netip.Addr // 198.51.100.2, proxy eth0: ss-server

	// IPv6.
	ClientIP6   netip.Addr // fd77::2
	GatewayLAN6 netip.Addr // fd77::1
	GatewayWAN6 netip.Addr // 2001:db8:1::1
	UpstreamIP6 netip.Addr // 2001:db8:1::2
	ProxyGW6    netip.Addr // 2001:db8:2::1
	ProxyIP6    netip.Addr // 2001:db8:2::2

	LANPrefix, LANPrefix6 netip.Prefix // 192.168.77.0/24, fd77::/64

	LANIface, WANIface string // "lan0", "wan0" inside the gateway

	namespaces []*NS    // created so far, deleted in cleanup
	etcDirs    []string // /etc/netns/<name> directories we created
	ipPath     string   // full path of iproute2's ip
	handles    []*netlink.Handle
}

var (
	lanPrefix4  = netip.MustParsePrefix("192.168.77.0/24")
	lanPrefix6  = netip.MustParsePrefix("fd77::/64")
	wanPrefix4  = netip.MustParsePrefix("203.0.113.0/24")
	wanPrefix6  = netip.MustParsePrefix("2001:db8:1::/64")
	prxPrefix4  = netip.MustParsePrefix("198.51.100.0/24")
	prxPrefix6  = netip.MustParsePrefix("2001:db8:2::/64")
	defaultDst4 = netip.MustParsePrefix("0.0.0.0/0")
	defaultDst6 = netip.MustParsePrefix("::/0")
)

// New builds a fresh topology for one test: namespaces named
// "tpgw-<role>-<6 hex>" (role cli, gw, up, prx; one suffix per call), veths,
// addresses, routes and sysctls. t.Cleanup stops what was started through it
// and deletes the namespaces, also when New fails halfway. It needs root and
// iproute2's ip, and skips (fails under CI=true) without them.
func New(t testing.TB) *Topology {
	t.Helper()
	testenv.RequireRoot(t)
	ipPath, err := lookTool("ip")
	if err != nil {
		testenv.RequireTools(t, "ip") // reports the missing tool the house way
		t.Fatalf("testnet: ip: %v", err)
	}
	tp := &Topology{
		ClientIP:    netip.MustParseAddr("192.168.77.2"),
		GatewayLAN:  netip.MustParseAddr("192.168.77.1"),
		GatewayWAN:  netip.MustParseAddr("203.0.113.1"),
		UpstreamIP:  netip.MustParseAddr("203.0.113.2"),
		ProxyGW:     netip.MustParseAddr("198.51.100.1"),
		ProxyIP:     netip.MustParseAddr("198.51.100.2"),
		ClientIP6:   netip.MustParseAddr("fd77::2"),
		GatewayLAN6: netip.MustParseAddr("fd77::1"),
		GatewayWAN6: netip.MustParseAddr("2001:db8:1::1"),
		UpstreamIP6: netip.MustParseAddr("2001:db8:1::2"),
		ProxyGW6:    netip.MustParseAddr("2001:db8:2::1"),
		ProxyIP6:    netip.MustParseAddr("2001:db8:2::2"),
		LANPrefix:   lanPrefix4,
		LANPrefix6:  lanPrefix6,
		LANIface:    LANIface,
		WANIface:    WANIface,
		ipPath:      ipPath,
	}
	// Registered before the first namespace exists: whatever New gets done is undone.
	t.Cleanup(func() {
		if err := tp.destroy(); err != nil {
			t.Errorf("testnet: cleanup: %v", err)
		}
	})
	if err := tp.build(); err != nil {
		t.Fatalf("testnet: build topology: %v", err)
	}
	return tp
}

// Namespaces returns the four namespaces: client, gateway, upstream, proxy.
func (tp *Topology) Namespaces() []*NS {
	return []*NS{tp.Client, tp.Gateway, tp.Upstream, tp.Proxy}
}

func (tp *Topology) build() error {
	var suffix [3]byte
	if _, err := rand.Read(suffix[:]); err != nil {
		return err
	}
	tag := hex.EncodeToString(suffix[:])
	roles := []struct {
		role string
		ns   **NS
		// resolver is the nameserver `ip netns exec` programs see: the client
		// asks its gateway (tpgw hijacks DNS there), the rest ask dnsmasq.
		resolver netip.Addr
	}{
		{"cli", &tp.Client, tp.GatewayLAN},
		{"gw", &tp.Gateway, tp.UpstreamIP},
		{"up", &tp.Upstream, tp.UpstreamIP},
		{"prx", &tp.Proxy, tp.UpstreamIP},
	}
	for _, r := range roles {
		ns, err := tp.newNS("tpgw-"+r.role+"-"+tag, r.resolver)
		if err != nil {
			return err
		}
		*r.ns = ns
	}

	cli, gw, up, prx := tp.handle(tp.Client), tp.handle(tp.Gateway), tp.handle(tp.Upstream), tp.handle(tp.Proxy)
	if cli == nil || gw == nil || up == nil || prx == nil {
		return errors.New("netlink handle missing")
	}

	// Each veth is created inside one namespace with its peer directly in the
	// other, so no interface ever appears in the host namespace.
	if err := addVeth(gw, LANIface, tp.Client, ClientIface); err != nil {
		return err
	}
	if err := addVeth(gw, WANIface, tp.Upstream, UpstreamIface); err != nil {
		return err
	}
	if err := addVeth(up, UpstreamProxyIface, tp.Proxy, ProxyIface); err != nil {
		return err
	}

	type iface struct {
		h      *netlink.Handle
		ns     *NS
		name   string
		addrs  []netip.Addr
		prefix []netip.Prefix
	}
	ifaces := []iface{
		{cli, tp.Client, ClientIface, []netip.Addr{tp.ClientIP, tp.ClientIP6}, []netip.Prefix{lanPrefix4, lanPrefix6}},
		{gw, tp.Gateway, LANIface, []netip.Addr{tp.GatewayLAN, tp.GatewayLAN6}, []netip.Prefix{lanPrefix4, lanPrefix6}},
		{gw, tp.Gateway, WANIface, []netip.Addr{tp.GatewayWAN, tp.GatewayWAN6}, []netip.Prefix{wanPrefix4, wanPrefix6}},
		{up, tp.Upstream, UpstreamIface, []netip.Addr{tp.UpstreamIP, tp.UpstreamIP6}, []netip.Prefix{wanPrefix4, wanPrefix6}},
		{up, tp.Upstream, UpstreamProxyIface, []netip.Addr{tp.ProxyGW, tp.ProxyGW6}, []netip.Prefix{prxPrefix4, prxPrefix6}},
		{prx, tp.Proxy, ProxyIface, []netip.Addr{tp.ProxyIP, tp.ProxyIP6}, []netip.Prefix{prxPrefix4, prxPrefix6}},
	}
	for _, ifc := range ifaces {
		link, err := ifc.h.LinkByName(ifc.name)
		if err != nil {
			return fmt.Errorf("%s: find %s: %w", ifc.ns.Name, ifc.name, err)
		}
		for i, a := range ifc.addrs {
			addr := &netlink.Addr{
				IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(ifc.prefix[i].Bits(), a.BitLen())},
				// No duplicate address detection: v6 addresses are usable at once
				// instead of "tentative" for a second or two.
				Flags: unix.IFA_F_NODAD,
			}
			if err := ifc.h.AddrAdd(link, addr); err != nil {
				return fmt.Errorf("%s: add %s/%d to %s: %w", ifc.ns.Name, a, ifc.prefix[i].Bits(), ifc.name, err)
			}
		}
		if err := ifc.h.LinkSetUp(link); err != nil {
			return fmt.Errorf("%s: set %s up: %w", ifc.ns.Name, ifc.name, err)
		}
	}

	routes := []struct {
		h    *netlink.Handle
		ns   *NS
		dst  netip.Prefix
		via  netip.Addr
		link string
	}{
		{cli, tp.Client, defaultDst4, tp.GatewayLAN, ClientIface},
		{cli, tp.Client, defaultDst6, tp.GatewayLAN6, ClientIface},
		{gw, tp.Gateway, defaultDst4, tp.UpstreamIP, WANIface},
		{gw, tp.Gateway, defaultDst6, tp.UpstreamIP6, WANIface},
		// The upstream knows the LAN only for kernel-forwarded (bypass) traffic,
		// which arrives with the client's own address.
		{up, tp.Upstream, lanPrefix4, tp.GatewayWAN, UpstreamIface},
		{up, tp.Upstream, lanPrefix6, tp.GatewayWAN6, UpstreamIface},
		{prx, tp.Proxy, defaultDst4, tp.ProxyGW, ProxyIface},
		{prx, tp.Proxy, defaultDst6, tp.ProxyGW6, ProxyIface},
	}
	for _, r := range routes {
		link, err := r.h.LinkByName(r.link)
		if err != nil {
			return fmt.Errorf("%s: find %s: %w", r.ns.Name, r.link, err)
		}
		route := &netlink.Route{
			LinkIndex: link.Attrs().Index,
			Dst:       &net.IPNet{IP: r.dst.Addr().AsSlice(), Mask: net.CIDRMask(r.dst.Bits(), r.dst.Addr().BitLen())},
			Gw:        r.via.AsSlice(),
		}
		if err := r.h.RouteAdd(route); err != nil {
			return fmt.Errorf("%s: route %s via %s dev %s: %w", r.ns.Name, r.dst, r.via, r.link, err)
		}
	}

	// The upstream routes between the gateway and the proxy.
	for _, key := range []string{"net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"} {
		if err := tp.Upstream.writeSysctl(key, "1"); err != nil {
			return err
		}
	}

	// Carrier and the IPv6 link-local address arrive asynchronously (the
	// kernel's linkwatch may delay them by up to a second). Wait for them, so
	// that tests start from a settled state and snapshots taken at once are
	// the same as snapshots taken later.
	deadline := time.Now().Add(settleTimeout)
	for _, ifc := range ifaces {
		if err := waitSettled(ifc.h, ifc.name, deadline); err != nil {
			return fmt.Errorf("%s: %w", ifc.ns.Name, err)
		}
	}
	return nil
}

// settleTimeout bounds the wait for interfaces to come up after New wires them.
const settleTimeout = 5 * time.Second

// waitSettled waits until the link is operationally up and has a usable
// (not tentative) IPv6 link-local address.
func waitSettled(h *netlink.Handle, name string, deadline time.Time) error {
	for {
		link, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("find %s: %w", name, err)
		}
		state := link.Attrs().OperState
		ready := false
		if state == netlink.OperUp {
			addrs, err := h.AddrList(link, netlink.FAMILY_V6)
			if err != nil {
				return fmt.Errorf("list addresses of %s: %w", name, err)
			}
			for _, a := range addrs {
				if a.IP.IsLinkLocalUnicast() && a.Flags&unix.IFA_F_TENTATIVE == 0 {
					ready = true
				}
			}
		}
		if ready {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %v (operstate %s)", name, settleTimeout, state)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// newNS creates a named namespace (visible to `ip netns`), brings lo up and
// turns duplicate address detection off for every interface made later.
func (tp *Topology) newNS(name string, resolver netip.Addr) (*NS, error) {
	handle, err := createNamedNS(name)
	if err != nil {
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	ns := &NS{Name: name, handle: handle, ipPath: tp.ipPath}
	tp.namespaces = append(tp.namespaces, ns)

	h, err := netlink.NewHandleAt(handle)
	if err != nil {
		return nil, fmt.Errorf("%s: netlink handle: %w", name, err)
	}
	tp.handles = append(tp.handles, h)
	lo, err := h.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("%s: find lo: %w", name, err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		return nil, fmt.Errorf("%s: set lo up: %w", name, err)
	}
	for _, key := range []string{"net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"} {
		if err := ns.writeSysctl(key, "0"); err != nil {
			return nil, err
		}
	}

	// `ip netns exec` bind-mounts /etc/netns/<name>/* over /etc, so programs
	// run through Run and Start resolve names inside the topology, never via
	// the host's resolver.
	dir := filepath.Join("/etc/netns", name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	tp.etcDirs = append(tp.etcDirs, dir)
	if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte("nameserver "+resolver.String()+"\n"), 0o644); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return ns, nil
}

// handle returns the netlink handle of ns (handles are made in newNS, in the
// same order as tp.namespaces).
func (tp *Topology) handle(ns *NS) *netlink.Handle {
	for i, n := range tp.namespaces {
		if n == ns && i < len(tp.handles) {
			return tp.handles[i]
		}
	}
	return nil
}

// netnsRunDir is where named network namespaces are bound (iproute2's and
// vishvananda/netns's NETNS_RUN_DIR).
const netnsRunDir = "/run/netns"

var runDirMu sync.Mutex

// shareRunDir makes netnsRunDir a shared mount point, as the first
// `ip netns add` of a boot does. Namespaces bound while it is a plain
// directory are copied when a later `ip netns add` turns it into a mount
// point (a recursive bind of itself): deleting one then unmounts only the
// copy on top, and removing its file fails with EBUSY, the copy underneath
// still using it, so the namespace is left behind. Tests run `ip netns add`
// (e2e's containers), and on a fresh machine a CI run failed so.
func shareRunDir() error {
	runDirMu.Lock() // parallel tests: one bind, not two stacked
	defer runDirMu.Unlock()
	if err := os.MkdirAll(netnsRunDir, 0o755); err != nil {
		return err
	}
	err := unix.Mount("", netnsRunDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if err != unix.EINVAL { // nil, or a real failure
		return err
	}
	// EINVAL: not a mount point yet.
	if err := unix.Mount(netnsRunDir, netnsRunDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s on itself: %w", netnsRunDir, err)
	}
	return unix.Mount("", netnsRunDir, "none", unix.MS_SHARED|unix.MS_REC, "")
}

// createNamedNS creates a network namespace bound at /run/netns/name without
// moving the calling goroutine's thread: the switch happens on a locked thread
// that is switched back, or retired if that fails.
func createNamedNS(name string) (netns.NsHandle, error) {
	if err := shareRunDir(); err != nil {
		return netns.None(), fmt.Errorf("make %s a shared mount point: %w", netnsRunDir, err)
	}
	type result struct {
		h   netns.NsHandle
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		origin, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{netns.None(), err}
			return
		}
		defer origin.Close()
		h, err := netns.NewNamed(name)
		if restoreErr := netns.Set(origin); restoreErr != nil {
			// Thread stays locked and dies with this goroutine.
			if err == nil {
				h.Close()
			}
			done <- result{netns.None(), errors.Join(err, fmt.Errorf("leave new netns: %w", restoreErr))}
			return
		}
		runtime.UnlockOSThread()
		done <- result{h, err}
	}()
	r := <-done
	return r.h, r.err
}

func addVeth(h *netlink.Handle, name string, peerNS *NS, peerName string) error {
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: name},
		PeerName:      peerName,
		PeerNamespace: netlink.NsFd(int(peerNS.handle)),
	}
	if err := h.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s <-> %s:%s: %w", name, peerNS.Name, peerName, err)
	}
	return nil
}

// destroy deletes everything build created, in reverse order; processes and
// Go peers registered their own cleanups later, so they are already gone.
func (tp *Topology) destroy() error {
	var errs []error
	for _, h := range tp.handles {
		h.Close()
	}
	tp.handles = nil
	for i := len(tp.namespaces) - 1; i >= 0; i-- {
		ns := tp.namespaces[i]
		if err := netns.DeleteNamed(ns.Name); err != nil {
			errs = append(errs, fmt.Errorf("delete netns %s: %w", ns.Name, err))
		}
		ns.handle.Close()
	}
	tp.namespaces = nil
	for _, dir := range tp.etcDirs {
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
		}
	}
	tp.etcDirs = nil
	return errors.Join(errs...)
}
