package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Defaults from design.md.
const (
	DefaultTProxyPort  = 7893
	DefaultDNSListen   = "0.0.0.0:1053"
	DefaultFakeIPRange = "198.18.0.1/16"
	DefaultMark        = 666
	DefaultTable       = 666
	DefaultStateDir    = "/run/tpgw"
	// UDP sessions: idle timeout and table bound.
	DefaultUDPTimeout     = 60 * time.Second
	DefaultUDPMaxSessions = 4096
	// DefaultSelfRoutingMark is the SO_MARK given to the engine's sockets when
	// proxy-self is on and the mihomo part sets no routing-mark: without it the
	// engine's own outbound traffic would be re-routed into the relay (a loop).
	DefaultSelfRoutingMark = 0x2333
)

// Backends accepted by tpgw.backend.
const (
	BackendAuto     = "auto"
	BackendNftables = "nftables"
	BackendIPTables = "iptables"
)

// Failure policies accepted by tpgw.on-failure.
const (
	FailOpen   = "open"
	FailClosed = "closed"
)

// Config is a loaded, validated configuration file.
type Config struct {
	// Path is the file it was read from ("" when parsed from bytes).
	Path string
	// Raw is the whole file, handed to the engine as it is.
	Raw []byte

	// From mihomo's keys.
	TProxyPort  uint16
	RoutingMark uint32 // 0 = none
	IPv6        bool   // mihomo's top-level ipv6 (default true)
	DNS         DNS

	Gateway Gateway
}

// DNS is what the gateway needs from mihomo's dns block.
type DNS struct {
	Enable       bool
	Listen       netip.AddrPort
	EnhancedMode string
	FakeIPRange  netip.Prefix
	FakeIPRange6 netip.Prefix // zero when not set

	listenNode *yaml.Node // where dns.listen is, for errors; nil for the default
}

// FakeIP reports whether the fake-ip DNS server should run.
func (d DNS) FakeIP() bool { return d.Enable && d.EnhancedMode == "fake-ip" }

// Gateway is the `tpgw:` section.
type Gateway struct {
	Backend    string
	Interfaces []string
	Mark       uint32
	Table      int
	Bypass     []netip.Prefix
	BypassSrc  []netip.Prefix
	ProxySelf  bool
	IPv6       bool
	OnFailure  string
	DNSHijack  bool
	Forward    bool
	StateDir   string
	// StateDirLine is the line of tpgw.state-dir, 0 when not in the file.
	StateDirLine int
	// UDPTimeout is the idle time after which a UDP session's reply socket is
	// closed; UDPMaxSessions bounds the session table.
	UDPTimeout     time.Duration
	UDPMaxSessions int
	// DNSBypass: the fake-ip DNS server answers names whose flows mihomo's
	// rules send to the literal DIRECT for certain with their real addresses,
	// and puts those in a kernel set that is forwarded without tpgw
	// (nftables only; see dns/doc.go).
	DNSBypass bool
}

// Error is a configuration error that names the key and the line.
type Error struct {
	File string
	Line int // 0 when unknown
	Key  string
	Msg  string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("config")
	if e.File != "" {
		b.WriteString(" " + e.File)
	}
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	b.WriteString(": ")
	if e.Key != "" {
		b.WriteString(e.Key + ": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Load reads and validates the file at path.
func Load(path string) (*Config, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, err := Parse(raw, path)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// Dir is the directory of the config file: mihomo's home directory (relative
// paths of rule providers, cache.db with the persisted fake-ip pool).
func (c *Config) Dir() string {
	if c.Path == "" {
		return "."
	}
	d, err := filepath.Abs(filepath.Dir(c.Path))
	if err != nil {
		return filepath.Dir(c.Path)
	}
	return d
}

// Parse validates raw as a config file; file is used in error messages only.
func Parse(raw []byte, file string) (*Config, error) {
	p := parser{file: file}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, p.errf(nil, "", "file is empty")
		}
		line := yamlErrLine(err)
		msg := strings.TrimPrefix(err.Error(), "yaml: ")
		msg = strings.TrimPrefix(msg, fmt.Sprintf("line %d: ", line))
		return nil, &Error{File: file, Line: line, Msg: "invalid YAML: " + msg}
	}
	if len(doc.Content) == 0 {
		return nil, p.errf(nil, "", "file is empty")
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, p.errf(root, "", "top level must be a mapping of keys")
	}

	c := &Config{
		Path:       file,
		Raw:        raw,
		TProxyPort: DefaultTProxyPort,
		IPv6:       true,
		Gateway: Gateway{
			Backend:   BackendAuto,
			Mark:      DefaultMark,
			Table:     DefaultTable,
			IPv6:      true,
			OnFailure: FailOpen,
			DNSHijack: true,
			Forward:   true,
			StateDir:  DefaultStateDir,

			UDPTimeout:     DefaultUDPTimeout,
			UDPMaxSessions: DefaultUDPMaxSessions,
		},
	}
	c.DNS.Listen = netip.MustParseAddrPort(DefaultDNSListen)
	c.DNS.FakeIPRange = netip.MustParsePrefix(DefaultFakeIPRange)

	var tpgwNode *yaml.Node
	top, _ := pairs(root)
	for _, kv := range top {
		k, v := kv[0], kv[1]
		var err error
		switch k.Value {
		case "tpgw":
			tpgwNode = v
		case "tproxy-port":
			var port int
			if err = p.decode(v, "tproxy-port", &port); err == nil {
				c.TProxyPort, err = p.port(v, "tproxy-port", port)
			}
		case "routing-mark":
			var m int64
			if err = p.decode(v, "routing-mark", &m); err == nil {
				c.RoutingMark, err = p.mark(v, "routing-mark", m, true)
			}
		case "ipv6":
			err = p.decode(v, "ipv6", &c.IPv6)
		case "dns":
			err = p.parseDNS(v, &c.DNS)
		}
		if err != nil {
			return nil, err
		}
	}
	if tpgwNode != nil {
		if err := p.parseGateway(tpgwNode, &c.Gateway, c.DNS); err != nil {
			return nil, err
		}
	}
	if c.TProxyPort == 0 {
		return nil, p.errf(nil, "tproxy-port", "must be set: it is the port of tpgw's TPROXY listener")
	}
	if err := p.checkPorts(c, inbounds(root)); err != nil {
		return nil, err
	}
	if c.Gateway.ProxySelf && c.RoutingMark == 0 {
		c.RoutingMark = DefaultSelfRoutingMark
	}
	if c.RoutingMark != 0 && c.RoutingMark == c.Gateway.Mark {
		return nil, p.errf(nil, "routing-mark", "%d is the same as tpgw.mark: the engine's own traffic would be sent back into the relay", c.RoutingMark)
	}
	if c.DNS.Enable && c.DNS.Listen.Port() == c.TProxyPort {
		return nil, p.errf(c.DNS.listenNode, "dns.listen", "port %d is also tproxy-port: the DNS listener and the TPROXY listener need a port each", c.TProxyPort)
	}
	if c.DNS.FakeIP() && c.DNS.Listen.Port() == 53 {
		return nil, p.errf(c.DNS.listenNode, "dns.listen", "port 53: tpgw hands the LAN's DNS queries (port 53, to any server) to this listener, so it must listen on another port, such as 0.0.0.0:1053; clients still ask port 53")
	}
	return c, nil
}

type parser struct{ file string }

func (p parser) errf(n *yaml.Node, key, format string, args ...any) error {
	e := &Error{File: p.file, Key: key, Msg: fmt.Sprintf(format, args...)}
	if n != nil {
		e.Line = n.Line
	}
	return e
}

func (p parser) decode(n *yaml.Node, key string, v any) error {
	if err := n.Decode(v); err != nil {
		msg := err.Error()
		if te := (*yaml.TypeError)(nil); errors.As(err, &te) && len(te.Errors) > 0 {
			msg = te.Errors[0]
			// "line 3: cannot unmarshal !!str `x` into int" → drop the line prefix, we add our own.
			if i := strings.Index(msg, ": "); strings.HasPrefix(msg, "line ") && i > 0 {
				msg = msg[i+2:]
			}
		}
		return p.errf(n, key, "%s", msg)
	}
	return nil
}

func (p parser) port(n *yaml.Node, key string, v int) (uint16, error) {
	if v < 0 || v > 65535 {
		return 0, p.errf(n, key, "%d is not a port (0-65535)", v)
	}
	return uint16(v), nil
}

func (p parser) mark(n *yaml.Node, key string, v int64, zeroOK bool) (uint32, error) {
	if v < 0 || v > 0xffffffff {
		return 0, p.errf(n, key, "%d is not a firewall mark (1-4294967295)", v)
	}
	if v == 0 && !zeroOK {
		return 0, p.errf(n, key, "must not be 0 (0 means no mark)")
	}
	return uint32(v), nil
}

func (p parser) parseDNS(n *yaml.Node, d *DNS) error {
	kvs, ok := pairs(n)
	if !ok {
		if n.Tag == "!!null" {
			return nil
		}
		return p.errf(n, "dns", "must be a mapping")
	}
	for _, kv := range kvs {
		k, v := kv[0], kv[1]
		key := "dns." + k.Value
		var err error
		switch k.Value {
		case "enable":
			err = p.decode(v, key, &d.Enable)
		case "enhanced-mode":
			err = p.decode(v, key, &d.EnhancedMode)
		case "listen":
			d.listenNode = v
			var s string
			if err = p.decode(v, key, &s); err == nil {
				d.Listen, err = parseListen(s)
				if err != nil {
					err = p.errf(v, key, "%q: %v", s, err)
				}
			}
		case "fake-ip-range", "fake-ip-range6":
			var s string
			if err = p.decode(v, key, &s); err == nil {
				var pr netip.Prefix
				pr, err = netip.ParsePrefix(s)
				switch {
				case err != nil:
					err = p.errf(v, key, "%q is not a CIDR", s)
				case k.Value == "fake-ip-range" && !pr.Addr().Is4():
					err = p.errf(v, key, "%q must be an IPv4 CIDR", s)
				case k.Value == "fake-ip-range6" && !pr.Addr().Is6():
					err = p.errf(v, key, "%q must be an IPv6 CIDR", s)
				case k.Value == "fake-ip-range":
					d.FakeIPRange = pr
				default:
					d.FakeIPRange6 = pr
				}
			}
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// fakeRangeOverlapping is the fake-ip range of d that overlaps pr, if d
// hands out fake IPs.
func fakeRangeOverlapping(d DNS, pr netip.Prefix) netip.Prefix {
	if !d.FakeIP() {
		return netip.Prefix{}
	}
	for _, r := range []netip.Prefix{d.FakeIPRange, d.FakeIPRange6} {
		if r.IsValid() && r.Masked().Overlaps(pr) {
			return r.Masked()
		}
	}
	return netip.Prefix{}
}

// parseListen accepts mihomo's forms: "0.0.0.0:1053", ":1053", "[::]:1053".
func parseListen(s string) (netip.AddrPort, error) {
	if strings.HasPrefix(s, ":") {
		s = "0.0.0.0" + s
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, errors.New("want ADDRESS:PORT, e.g. 0.0.0.0:1053")
	}
	if ap.Port() == 0 {
		// A port the kernel picks: the hijack would have no port to hand
		// the LAN's queries to.
		return netip.AddrPort{}, errors.New("port 0: want a fixed port, e.g. 0.0.0.0:1053")
	}
	return ap, nil
}

var gatewayKeys = []string{"backend", "interfaces", "mark", "table", "bypass", "bypass-src", "proxy-self", "ipv6", "on-failure", "dns-hijack", "forward", "state-dir", "udp-timeout", "udp-max-sessions", "dns-bypass"}

func (p parser) parseGateway(n *yaml.Node, g *Gateway, dns DNS) error {
	if n.Tag == "!!null" {
		return nil
	}
	kvs, ok := pairs(n)
	if !ok {
		return p.errf(n, "tpgw", "must be a mapping of keys")
	}
	seen := map[string]bool{}
	var dnsBypassNode *yaml.Node
	for _, kv := range kvs {
		k, v := kv[0], kv[1]
		key := "tpgw." + k.Value
		if seen[k.Value] {
			return p.errf(k, key, "appears twice")
		}
		seen[k.Value] = true
		var err error
		switch k.Value {
		case "backend":
			if err = p.decode(v, key, &g.Backend); err == nil {
				switch g.Backend {
				case BackendAuto, BackendNftables, BackendIPTables:
				default:
					err = p.errf(v, key, "%q is not a backend (want auto, nftables or iptables)", g.Backend)
				}
			}
		case "interfaces":
			if err = p.decode(v, key, &g.Interfaces); err == nil {
				for _, name := range g.Interfaces {
					if name == "" || len(name) > 15 || strings.ContainsAny(name, " \t\n/\"\\") {
						err = p.errf(v, key, "%q is not an interface name", name)
						break
					}
					// iptables reads eth+ as every eth interface, nftables
					// eth* (and eth+ as a name): the same config would
					// intercept different interfaces under each backend.
					if strings.ContainsAny(name, "*+") {
						err = p.errf(v, key, "%q: wildcards are not supported; list each interface by name", name)
						break
					}
				}
			}
		case "mark":
			var m int64
			if err = p.decode(v, key, &m); err == nil {
				g.Mark, err = p.mark(v, key, m, false)
			}
		case "table":
			var t int64
			if err = p.decode(v, key, &t); err == nil {
				switch {
				case t <= 0 || t > 0x7fffffff:
					err = p.errf(v, key, "%d is not a routing table (1-2147483647)", t)
				case t == 253 || t == 254 || t == 255:
					err = p.errf(v, key, "%d is a kernel table (default/main/local); choose another", t)
				default:
					g.Table = int(t)
				}
			}
		case "bypass", "bypass-src":
			var list []string
			if err = p.decode(v, key, &list); err == nil {
				var out []netip.Prefix
				for j, s := range list {
					line := v
					if j < len(v.Content) {
						line = v.Content[j]
					}
					pr, perr := parseCIDR(s)
					if perr != nil {
						err = p.errf(line, key, "%q is not a CIDR or address", s)
						break
					}
					// The fake-ip range is always intercepted, ahead of the
					// bypass: an overlap would silently not be bypassed.
					if fake := fakeRangeOverlapping(dns, pr); fake.IsValid() && k.Value == "bypass" {
						err = p.errf(line, key, "%q overlaps dns's fake-ip range %s, whose addresses are always intercepted", s, fake)
						break
					}
					out = append(out, pr)
				}
				if k.Value == "bypass" {
					g.Bypass = out
				} else {
					g.BypassSrc = out
				}
			}
		case "proxy-self":
			err = p.decode(v, key, &g.ProxySelf)
		case "ipv6":
			err = p.decode(v, key, &g.IPv6)
		case "on-failure":
			if err = p.decode(v, key, &g.OnFailure); err == nil && g.OnFailure != FailOpen && g.OnFailure != FailClosed {
				err = p.errf(v, key, "%q is not a failure policy (want open or closed)", g.OnFailure)
			}
		case "dns-hijack":
			err = p.decode(v, key, &g.DNSHijack)
		case "forward":
			err = p.decode(v, key, &g.Forward)
		case "state-dir":
			g.StateDirLine = v.Line
			if err = p.decode(v, key, &g.StateDir); err == nil && !filepath.IsAbs(g.StateDir) {
				err = p.errf(v, key, "%q must be an absolute path", g.StateDir)
			}
		case "udp-timeout":
			var d string
			if err = p.decode(v, key, &d); err == nil {
				g.UDPTimeout, err = time.ParseDuration(d)
				if err != nil || g.UDPTimeout < time.Second || g.UDPTimeout > 24*time.Hour {
					err = p.errf(v, key, "%q is not a duration between 1s and 24h (e.g. 60s, 5m)", d)
				}
			}
		case "udp-max-sessions":
			if err = p.decode(v, key, &g.UDPMaxSessions); err == nil && (g.UDPMaxSessions < 16 || g.UDPMaxSessions > 1<<20) {
				err = p.errf(v, key, "%d is out of range (16-1048576)", g.UDPMaxSessions)
			}
		case "dns-bypass":
			err = p.decode(v, key, &g.DNSBypass)
			dnsBypassNode = v
		default:
			return p.errf(k, key, "unknown key (known: %s)", strings.Join(gatewayKeys, ", "))
		}
		if err != nil {
			return err
		}
	}
	if g.DNSBypass {
		switch {
		case g.Backend == BackendIPTables:
			return p.errf(dnsBypassNode, "tpgw.dns-bypass", "needs the nftables backend (tpgw.backend is iptables)")
		case !dns.FakeIP():
			return p.errf(dnsBypassNode, "tpgw.dns-bypass", "needs the fake-ip DNS server (dns.enable: true, dns.enhanced-mode: fake-ip)")
		}
	}
	return nil
}

// parseCIDR accepts "10.0.0.0/8" or a bare address (a /32 or /128).
func parseCIDR(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		pr, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		return pr.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func yamlErrLine(err error) int {
	// yaml.v3 syntax errors read "yaml: line 7: did not find expected key".
	msg := err.Error()
	i := strings.Index(msg, "line ")
	if i < 0 {
		return 0
	}
	rest := msg[i+5:]
	j := strings.IndexFunc(rest, func(r rune) bool { return r < '0' || r > '9' })
	if j <= 0 {
		return 0
	}
	n, _ := strconv.Atoi(rest[:j])
	return n
}
