//go:build tpgw_slim

// tpgw's router build: this file replaces mihomo v1.19.24's
// listener/listener.go through `go build -overlay` (see packaging/slim.go).
//
// tpgw serves its own TPROXY and DNS listeners, so of mihomo's inbound
// servers the router build keeps only the small, common ones: http (port),
// socks (socks-port), mixed (mixed-port), and tproxy (tproxy-port; tpgw turns it
// off, the executor links it anyway). redir-port, ss-config, vmess-config,
// tuic-server, tunnels and tun are accepted and ignored here, so that
// mihomo's config and API code compile unchanged without naming the servers'
// code; tpgw's engine reports each ignored key when it checks a config.
//
// The package-level state is mihomo's API (these functions are called by
// hub/executor and hub/route); one mutex guards it.
package listener

import (
	"fmt"
	"net"
	"strconv"
	"sync"

	C "github.com/metacubex/mihomo/constant"
	LC "github.com/metacubex/mihomo/listener/config"
	"github.com/metacubex/mihomo/listener/http"
	"github.com/metacubex/mihomo/listener/mixed"
	"github.com/metacubex/mihomo/listener/socks"
	"github.com/metacubex/mihomo/listener/tproxy"
	"github.com/metacubex/mihomo/log"
)

// addrListener is what the kept servers' TCP and UDP listeners have in common.
type addrListener interface {
	RawAddress() string
	Address() string
	Close() error
}

// server is one port-configured inbound server: a TCP listener and, for
// socks, mixed and tproxy, a UDP one on the same address.
type server struct {
	name string
	tcp  addrListener
	udp  addrListener
}

var (
	mu          sync.Mutex
	allowLan    = false
	bindAddress = "*"

	httpServer   = &server{name: "HTTP proxy"}
	socksServer  = &server{name: "SOCKS proxy"}
	mixedServer  = &server{name: "Mixed(http+socks) proxy"}
	tproxyServer = &server{name: "TProxy server"}

	inboundListeners = map[string]C.InboundListener{}

	// Left at their zero values (disabled): the servers are not built.
	LastTunConf  LC.Tun
	LastTuicConf LC.TuicServer
)

type Ports struct {
	Port              int    `json:"port"`
	SocksPort         int    `json:"socks-port"`
	RedirPort         int    `json:"redir-port"`
	TProxyPort        int    `json:"tproxy-port"`
	MixedPort         int    `json:"mixed-port"`
	ShadowSocksConfig string `json:"ss-config"`
	VmessConfig       string `json:"vmess-config"`
}

func GetTunConf() LC.Tun                   { return LastTunConf }
func GetTuicConf() LC.TuicServer           { return LC.TuicServer{Enable: false} }
func AllowLan() bool                       { mu.Lock(); defer mu.Unlock(); return allowLan }
func BindAddress() string                  { mu.Lock(); defer mu.Unlock(); return bindAddress }
func SetAllowLan(al bool)                  { mu.Lock(); defer mu.Unlock(); allowLan = al }
func SetBindAddress(host string)           { mu.Lock(); defer mu.Unlock(); bindAddress = host }
func ReCreateRedir(int, C.Tunnel)          {}
func ReCreateShadowSocks(string, C.Tunnel) {}
func ReCreateVmess(string, C.Tunnel)       {}
func ReCreateTuic(LC.TuicServer, C.Tunnel) {}
func ReCreateTun(LC.Tun, C.Tunnel)         {}
func PatchTunnel([]LC.Tunnel, C.Tunnel)    {}
func Cleanup()                             {}

func ReCreateHTTP(port int, tunnel C.Tunnel) {
	httpServer.recreate(port, func(addr string) (addrListener, addrListener, error) {
		l, err := http.New(addr, tunnel)
		if err != nil {
			return nil, nil, err
		}
		return l, nil, nil
	})
}

func ReCreateSocks(port int, tunnel C.Tunnel) {
	socksServer.recreate(port, func(addr string) (addrListener, addrListener, error) {
		l, err := socks.New(addr, tunnel)
		if err != nil {
			return nil, nil, err
		}
		return withSocksUDP(l, addr, tunnel)
	})
}

func ReCreateMixed(port int, tunnel C.Tunnel) {
	mixedServer.recreate(port, func(addr string) (addrListener, addrListener, error) {
		l, err := mixed.New(addr, tunnel)
		if err != nil {
			return nil, nil, err
		}
		return withSocksUDP(l, addr, tunnel)
	})
}

// withSocksUDP adds the SOCKS5 UDP listener on addr to the TCP listener l
// (socks-port and mixed-port both serve UDP ASSOCIATE); l is closed if it
// cannot be opened.
func withSocksUDP(l addrListener, addr string, tunnel C.Tunnel) (addrListener, addrListener, error) {
	u, err := socks.NewUDP(addr, tunnel)
	if err != nil {
		l.Close()
		return nil, nil, err
	}
	return l, u, nil
}

func ReCreateTProxy(port int, tunnel C.Tunnel) {
	tproxyServer.recreate(port, func(addr string) (addrListener, addrListener, error) {
		l, err := tproxy.New(addr, tunnel)
		if err != nil {
			return nil, nil, err
		}
		u, err := tproxy.NewUDP(addr, tunnel)
		if err != nil {
			log.Warnln("Failed to start TProxy UDP Listener: %s", err)
			return l, nil, nil
		}
		return l, u, nil
	})
}

// recreate moves s to the address of port (closing it for port 0); an
// unchanged address keeps the running listeners.
func (s *server) recreate(port int, open func(addr string) (tcp, udp addrListener, err error)) {
	mu.Lock()
	defer mu.Unlock()
	addr := genAddr(bindAddress, port, allowLan)
	if s.tcp != nil && s.tcp.RawAddress() == addr {
		return
	}
	s.close()
	if portIsZero(addr) {
		return
	}
	tcp, udp, err := open(addr)
	if err != nil {
		log.Errorln("Start %s error: %s", s.name, err)
		return
	}
	s.tcp, s.udp = tcp, udp
	log.Infoln("%s listening at: %s", s.name, tcp.Address())
}

func (s *server) close() {
	if s.tcp != nil {
		s.tcp.Close()
		s.tcp = nil
	}
	if s.udp != nil {
		s.udp.Close()
		s.udp = nil
	}
}

func (s *server) port() int {
	if s.tcp == nil {
		return 0
	}
	_, p, _ := net.SplitHostPort(s.tcp.Address())
	n, _ := strconv.Atoi(p)
	return n
}

func PatchInboundListeners(newListenerMap map[string]C.InboundListener, tunnel C.Tunnel, dropOld bool) {
	mu.Lock()
	defer mu.Unlock()
	for name, l := range newListenerMap {
		if old, ok := inboundListeners[name]; ok {
			if old.Config().Equal(l.Config()) {
				continue
			}
			_ = old.Close()
		}
		if err := l.Listen(tunnel); err != nil {
			log.Errorln("Listener %s listen err: %s", name, err.Error())
			continue
		}
		inboundListeners[name] = l
	}
	if dropOld {
		for name, old := range inboundListeners {
			if _, ok := newListenerMap[name]; !ok {
				_ = old.Close()
				delete(inboundListeners, name)
			}
		}
	}
}

// GetPorts returns the ports of the running servers.
func GetPorts() *Ports {
	mu.Lock()
	defer mu.Unlock()
	return &Ports{
		Port:       httpServer.port(),
		SocksPort:  socksServer.port(),
		MixedPort:  mixedServer.port(),
		TProxyPort: tproxyServer.port(),
	}
}

func portIsZero(addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	return port == "0" || port == "" || err != nil
}

func genAddr(host string, port int, allowLan bool) string {
	if !allowLan {
		return fmt.Sprintf("127.0.0.1:%d", port)
	}
	if host == "*" {
		return fmt.Sprintf(":%d", port)
	}
	return net.JoinHostPort(host, strconv.Itoa(port))
}
