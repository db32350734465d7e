package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/metacubex/bbolt"
	"github.com/metacubex/mihomo/component/fakeip"
	"github.com/metacubex/mihomo/component/profile/cachefile"
	"github.com/metacubex/mihomo/config"
	C "github.com/metacubex/mihomo/constant"
	"github.com/metacubex/mihomo/hub"
	"github.com/metacubex/mihomo/hub/executor"
	mlog "github.com/metacubex/mihomo/log"
	"github.com/metacubex/mihomo/tunnel"
	"github.com/sirupsen/logrus"
	"gopkg.in/yaml.v3"
)

// InboundName is the inbound name mihomo sees for flows from tpgw's relay
// (usable in IN-NAME rules and shown in the dashboard).
const InboundName = "tpgw-tproxy"

// Options configure Start.
type Options struct {
	// HomeDir is mihomo's home directory: relative paths of providers and
	// cache.db (persisted fake-ip pool, selected proxies) live there.
	HomeDir string
	// RoutingMark, when non-zero, overrides the mihomo part's routing-mark: the
	// SO_MARK on every socket mihomo opens, which netcfg exempts from interception.
	RoutingMark uint32
	Logger      *slog.Logger
	// MihomoTProxy keeps mihomo's own tproxy inbound on tproxy-port instead
	// of tpgw's relay. Only for benchmarks that compare the two.
	MihomoTProxy bool
	// Controller answers the external-controller requests tpgw takes over
	// from mihomo (controller.go).
	Controller ControllerHooks
	// StateDir is where the position of a fake-ip pool kept in memory
	// (store-fake-ip: false) is saved, so that a restart does not hand its
	// addresses out again at once (fakeip.go). Empty: not saved.
	StateDir string
}

// Engine is a running mihomo core.
type Engine struct {
	log      *slog.Logger
	logStop  func()
	inAddr   netip.AddrPort
	once     sync.Once
	dnsView  atomic.Pointer[dnsView] // for ResolveDirect (bypass.go)
	parker   *parker                 // parked DIRECT flows (park.go)
	fakeIPs  *fakeIPKeeper           // saved fake-ip pool positions (fakeip.go); nil if none is saved
	stateDir string
	pools    []*fakeip.Pool // the running config's fake-ip pools (Reload hands their positions over)
	// controller is what the running external-controller server was built
	// from (Reload keeps the server when it is unchanged).
	controller string
	udpDrops   udpDropCounters // datagrams dropped before they were sent on (udpqueue.go)
	senders    []senderGate    // how full mihomo's per-session sender queues are (udpgate.go)
}

// started guards mihomo's process-wide state: one Engine per process.
var started sync.Mutex

// Check parses the mihomo part of raw the way Start would, without starting
// anything or writing files, and returns mihomo's error naming the problem.
func Check(raw []byte, homeDir string) error {
	if homeDir != "" {
		C.SetHomeDir(homeDir)
	}
	quietMihomoLog()
	rc, ignored, err := rawConfig(raw, 0)
	if err != nil {
		return err
	}
	warnIgnored(ignored, slog.Default())
	warnInboundsNotBuilt(rc, slog.Default())
	// Opening cache.db for the persisted fake-ip pool is a side effect; a check has none.
	rc.Profile.StoreFakeIP = false
	rc.Profile.StoreSelected = false
	if _, err := config.ParseRawConfig(rc); err != nil {
		return parseError(err)
	}
	return nil
}

// Start parses and applies the mihomo part of raw. The caller must Close it.
func Start(raw []byte, opts Options) (*Engine, error) {
	if !started.TryLock() {
		return nil, errors.New("engine: already running in this process")
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("part", "engine")
	if opts.HomeDir != "" {
		C.SetHomeDir(opts.HomeDir)
	}
	p, err := newParker()
	if err != nil {
		started.Unlock()
		return nil, err
	}
	e := &Engine{log: log, parker: p, senders: newSenderGates()}
	e.logStop = forwardMihomoLog(log)
	fail := func(err error) (*Engine, error) {
		e.parker.close()
		e.stopMappingWriter(liveMappings.Load())
		e.logStop()
		started.Unlock()
		return nil, err
	}

	rc, _, err := rawConfig(raw, opts.RoutingMark) // Check has warned
	if err != nil {
		return fail(err)
	}
	takeOverController(opts.Controller)
	if opts.MihomoTProxy {
		if err := keepMihomoTProxy(raw, rc); err != nil {
			return fail(err)
		}
	}
	if rc.Profile.StoreFakeIP || rc.Profile.StoreSelected {
		// mihomo's cache.db (bbolt) fsyncs every transaction, i.e. every new
		// fake IP: a burst of new names would queue DNS answers behind disk
		// flushes. Without fsync the data still reaches the page cache at
		// once, so it survives a crash of tpgw (not a power cut).
		// mihomo's writes also go through bbolt's Batch, which waits
		// MaxBatchDelay (10 ms) to coalesce; they come one at a time (a
		// selected proxy; the fake-ip pool's position), so every wait only
		// delayed them. A batch of one commits at once. tpgw writes new
		// fake-ip mappings itself, many per transaction (fakeipstore.go).
		if cf := cachefile.Cache(); cf != nil && cf.DB != nil {
			cf.DB.NoSync = true
			cf.DB.MaxBatchSize = 1
		}
	}
	cfg, err := config.ParseRawConfig(rc)
	if err != nil {
		return fail(parseError(err))
	}
	e.stateDir = opts.StateDir
	if err := e.keepMappingsInMemory(cfg); err != nil {
		return fail(err)
	}
	rawOutboundSockets(configProxies(cfg))
	rawProviderSockets(cfg.Providers)
	if e.fakeIPs, err = startFakeIPKeeper(cfg, e.stateDir, log); err != nil {
		return fail(err)
	}
	warnOpenController(cfg.Controller, log)
	hub.ApplyConfig(cfg)
	e.controller = controllerSettings(cfg)
	e.pools = fakeIPPools(cfg)
	livePools.Store(new(slices.Clone(e.pools)))
	logLevel.Store(int32(cfg.General.LogLevel))
	e.keepDNSView(cfg)
	log.Info("mihomo started", "proxies", len(tunnel.Proxies()), "rules", len(tunnel.Rules()),
		"mode", tunnel.Mode().String(), "routing_mark", cfg.General.RoutingMark,
		"external_controller", cfg.Controller.ExternalController)
	return e, nil
}

// keepMappingsInMemory gives cfg's persisted fake-ip pools memory stores
// (fakeipstore.go), before they answer anything, and has ServeDNS write
// their new mappings to cache.db.
func (e *Engine) keepMappingsInMemory(cfg *config.Config) error {
	var db *bbolt.DB
	if cfg.DNS != nil && cfg.Profile.StoreFakeIP {
		if cf := cachefile.Cache(); cf != nil {
			db = cf.DB
		}
	}
	old := liveMappings.Load()
	if db == nil {
		e.stopMappingWriter(old)
		return nil
	}
	// The journal goes into cache.db first, which the new pools load from
	// (after a crash, the mappings it holds are in cache.db only now).
	w := old
	if w != nil && w.db == db {
		if err := w.fold(); err != nil {
			return err
		}
		w.forgetStored() // the new pools' ranges are read anew
	} else {
		var err error
		if w, err = openMappingWriter(db, e.log); err != nil {
			return err
		}
	}
	swapped, err := keepInMemory(db, fakeIPPools(cfg), w)
	if err != nil || !swapped {
		if w != old {
			_ = w.close()
		}
		e.stopMappingWriter(old)
		return err
	}
	if w != old {
		liveMappings.Store(w)
		e.stopMappingWriter(old)
	}
	return nil
}

// stopMappingWriter folds w's journal into cache.db and closes it, when w
// is the live writer: the pools it wrote for are going.
func (e *Engine) stopMappingWriter(w *mappingWriter) {
	if w == nil || !liveMappings.CompareAndSwap(w, nil) {
		return
	}
	if err := w.close(); err != nil {
		e.log.Warn("fake-ip journal not folded into cache.db; the next start folds it", "err", err)
	}
}

// Reload applies a changed mihomo part. Established flows keep their
// outbound connections; new flows use the new rules and proxies.
func (e *Engine) Reload(raw []byte, routingMark uint32) error {
	rc, _, err := rawConfig(raw, routingMark) // Check has warned
	if err != nil {
		return err
	}
	// The new config's persisted pools start from the positions saved here.
	if e.fakeIPs != nil {
		e.fakeIPs.beforeReload()
	}
	cfg, err := config.ParseRawConfig(rc)
	if err != nil {
		return parseError(err)
	}
	placeAhead(e.pools, fakeIPPools(cfg))
	built := positions(fakeIPPools(cfg))
	if err := e.keepMappingsInMemory(cfg); err != nil {
		return err
	}
	rawOutboundSockets(configProxies(cfg))
	rawProviderSockets(cfg.Providers)
	// A reload keeps the external-controller's server unless its settings
	// changed: restarting it would cut the dashboard request that asked for
	// the reload (PUT /configs) and every dashboard's live streams.
	if ctl := controllerSettings(cfg); ctl == e.controller {
		executor.ApplyConfig(cfg, true)
	} else {
		hub.ApplyConfig(cfg)
		e.controller = ctl
	}
	warnOpenController(cfg.Controller, e.log)
	// No fake IP handed out so far goes to a new name now (fakeip.go).
	handOver(e.pools, built)
	e.pools = fakeIPPools(cfg)
	livePools.Store(new(slices.Clone(e.pools)))
	if e.fakeIPs != nil {
		e.fakeIPs.afterReload(cfg)
	} else if e.fakeIPs, err = startFakeIPKeeper(cfg, e.stateDir, e.log); err != nil {
		e.log.Warn("fake-ip pool position is saved only at a clean stop", "err", err)
	}
	logLevel.Store(int32(cfg.General.LogLevel))
	e.keepDNSView(cfg)
	e.log.Info("mihomo reloaded", "proxies", len(tunnel.Proxies()), "rules", len(tunnel.Rules()))
	return nil
}

// rawConfig unmarshals the mihomo part and turns off the parts tpgw replaces.
// ignored names the keys the config turned on that tpgw turned off, for a
// warning (warnIgnored).
func rawConfig(raw []byte, routingMark uint32) (rc *config.RawConfig, ignored []string, err error) {
	rc, err = config.UnmarshalRawConfig(raw)
	if err != nil {
		return nil, nil, fmt.Errorf("mihomo config: %w", err)
	}
	// tpgw's relay serves tproxy-port and tpgw's dns serves dns.listen; mihomo
	// must not bind them too. mihomo's iptables helper would fight netcfg.
	rc.TProxyPort = 0
	rc.DNS.Listen = ""
	rc.IPTables.Enable = false
	// mihomo's TUN (tun.enable, on in many desktop configs, or a listener
	// of type tun) would take the gateway's routing over beside tpgw's
	// TPROXY: its auto-route policy rules send every packet into its device,
	// and the clients' flows went nowhere (TestTunIgnored). tpgw is the
	// interception here.
	if rc.Tun.Enable {
		rc.Tun.Enable = false
		ignored = append(ignored, "tun.enable")
	}
	listeners := rc.Listeners[:0]
	for i, l := range rc.Listeners {
		if typ, _ := l["type"].(string); typ == "tun" {
			name, _ := l["name"].(string)
			ignored = append(ignored, fmt.Sprintf("listeners[%d] %s (type tun)", i, name))
			continue
		}
		listeners = append(listeners, l)
	}
	rc.Listeners = listeners
	if routingMark != 0 {
		rc.RoutingMark = int(routingMark)
	}
	// Clients cache fake-ip answers beyond a restart, so tpgw persists the
	// fake-ip table (in cache.db in the home dir) unless the config says no.
	var profile struct {
		Profile struct {
			StoreFakeIP *bool `yaml:"store-fake-ip"`
		} `yaml:"profile"`
	}
	if err := yaml.Unmarshal(raw, &profile); err == nil && profile.Profile.StoreFakeIP == nil {
		rc.Profile.StoreFakeIP = true
	}
	return rc, ignored, nil
}

// warnIgnored logs one warning per key rawConfig turned off. Check calls it,
// and Check runs before every start and reload.
func warnIgnored(keys []string, log *slog.Logger) {
	for _, key := range keys {
		log.Warn("config key ignored: tpgw intercepts the gateway's traffic with TPROXY (the tpgw: section); "+
			"mihomo's TUN would route it into a device of its own", "key", key)
	}
}

// keepMihomoTProxy restores the tproxy-port that rawConfig turned off.
func keepMihomoTProxy(raw []byte, rc *config.RawConfig) error {
	var port struct {
		TProxyPort int `yaml:"tproxy-port"`
	}
	if err := yaml.Unmarshal(raw, &port); err != nil {
		return fmt.Errorf("mihomo config: %w", err)
	}
	if port.TProxyPort == 0 {
		return errors.New("engine: MihomoTProxy needs tproxy-port in the config")
	}
	rc.TProxyPort = port.TProxyPort
	rc.AllowLan = true
	return nil
}

// SetInboundAddr records the relay's listening address, reported to mihomo as
// the inbound address of every flow (IN-PORT rules, dashboard).
func (e *Engine) SetInboundAddr(a netip.AddrPort) { e.inAddr = a }

// HandleTCP gives a TPROXYed TCP connection to mihomo: mihomo matches the
// rules (fake IPs are mapped back to domains first), dials the outbound and
// the flow is copied both ways with half-close. src is the client, dst the
// original destination (the accepted socket's local address). HandleTCP owns
// conn and closes it when the flow ends; it returns then, or earlier for a
// DIRECT flow, which tpgw relays without a goroutine of its own (park.go).
func (e *Engine) HandleTCP(conn net.Conn, src, dst netip.AddrPort) {
	md := e.metadata(C.TCP, src, dst)
	tc, ok := conn.(*net.TCPConn)
	// With mihomo's sniffer on, mihomo handles the flow itself (the sniffer
	// reads the first bytes before the rule match).
	if ok && !tunnel.IsSniffing() {
		e.handleTCP(tc, md)
		return
	}
	if ok {
		conn = lazySplice(tc)
	}
	tunnel.Tunnel.HandleTCPConn(conn, md)
}

// metadata describes a TPROXYed flow to mihomo.
func (e *Engine) metadata(network C.NetWork, src, dst netip.AddrPort) *C.Metadata {
	return &C.Metadata{
		NetWork: network,
		Type:    C.TPROXY,
		SrcIP:   src.Addr().Unmap(),
		SrcPort: src.Port(),
		DstIP:   dst.Addr().Unmap(),
		DstPort: dst.Port(),
		InName:  InboundName,
		InIP:    e.inAddr.Addr().Unmap(),
		InPort:  e.inAddr.Port(),
	}
}

// AbortFlows resets (RST) every DIRECT flow tpgw relays itself, at once; a
// gateway that stops calls it (with the relay's Abort) while its rules still
// bring the clients' packets here. Close does it too.
func (e *Engine) AbortFlows() { e.parker.closeAll() }

// Close resets the DIRECT flows tpgw relays, stops mihomo's listeners and
// persists the fake-ip pool state.
func (e *Engine) Close() error {
	e.once.Do(func() {
		if e.fakeIPs != nil {
			e.fakeIPs.close()
		}
		e.parker.close()
		executor.Shutdown()
		e.stopMappingWriter(liveMappings.Load())
		if e.fakeIPs != nil {
			if err := e.fakeIPs.unmark(); err != nil {
				e.log.Warn("fake-ip pool: clean stop not recorded; the next start will recover the position", "err", err)
			}
		}
		e.logStop()
		started.Unlock()
	})
	return nil
}

var quietOnce sync.Once

// quietMihomoLog stops mihomo's logrus output to stdout; its events are
// forwarded to slog by forwardMihomoLog instead.
func quietMihomoLog() {
	quietOnce.Do(func() { logrus.SetOutput(io.Discard) })
}

// logLevel is the running config's log-level, kept here because mihomo's
// own (log.Level) is a plain variable its ApplyConfig writes unsynchronized.
var logLevel atomic.Int32

func init() { logLevel.Store(int32(mlog.INFO)) }

func forwardMihomoLog(log *slog.Logger) (stop func()) {
	quietMihomoLog()
	sub := mlog.Subscribe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case ev, ok := <-sub:
				if !ok {
					return
				}
				if int32(ev.LogLevel) < logLevel.Load() {
					continue
				}
				log.Log(ctx, slogLevel(ev.LogLevel), strings.TrimSpace(ev.Payload))
			}
		}
	}()
	return func() {
		cancel()
		mlog.UnSubscribe(sub)
		<-done
	}
}

func slogLevel(l mlog.LogLevel) slog.Level {
	switch l {
	case mlog.DEBUG:
		return slog.LevelDebug
	case mlog.INFO:
		return slog.LevelInfo
	case mlog.WARNING:
		return slog.LevelWarn
	default:
		return slog.LevelError
	}
}
