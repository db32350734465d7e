package engine

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/metacubex/chi"
	"github.com/metacubex/http"
	"github.com/metacubex/mihomo/component/fakeip"
	"github.com/metacubex/mihomo/component/resolver"
	"github.com/metacubex/mihomo/component/updater"
	"github.com/metacubex/mihomo/config"
	C "github.com/metacubex/mihomo/constant"
	"github.com/metacubex/mihomo/hub/route"
	mlog "github.com/metacubex/mihomo/log"
	"github.com/metacubex/mihomo/tunnel"
)

// mihomo's external-controller (the API dashboards use) stays on, but the
// requests that would undo tpgw are tpgw's to answer. In mihomo they would:
//   - PUT /configs: apply a config without tpgw's changes to it, so mihomo
//     binds its own tproxy and DNS listeners and iptables, and drops tpgw's
//     routing-mark (loop prevention);
//   - PATCH /configs: open listeners and a TUN device beside tpgw's rules;
//   - POST /restart: exec tpgw again without removing its kernel rules;
//   - POST /upgrade: replace the tpgw binary with a mihomo binary.
// mihomo's embed mode takes those routes out (with PATCH /rules/disable and
// the geodata updates). tpgw adds back:
//   - PATCH /configs for mode, log-level and sniffing (what dashboards
//     switch); any other key is refused by name;
//   - PATCH /rules/disable and the geodata updates, as in mihomo;
//   - PUT /configs without a payload: tpgw's own reload of its config file
//     (as SIGHUP), which dashboards call "reload config";
//   - POST /restart and POST /upgrade: refused, saying why.

// ControllerHooks connect the external-controller's requests to the gateway.
type ControllerHooks struct {
	// Reload reloads tpgw's config file, as SIGHUP does.
	Reload func() error
	// DecisionsChanged is called after the mode, sniffing or a rule's
	// disabled flag changed: flows are decided differently from now on
	// (dns-bypass empties its sets).
	DecisionsChanged func()
}

var (
	controllerHooks atomic.Pointer[ControllerHooks]
	registerOnce    sync.Once
)

// patchableKeys are the PATCH /configs keys tpgw applies.
var patchableKeys = []string{"log-level", "mode", "sniffing"}

// takeOverController puts mihomo's external-controller in embed mode and
// adds tpgw's routes. It must run before mihomo starts the controller.
func takeOverController(h ControllerHooks) {
	controllerHooks.Store(&h)
	registerOnce.Do(func() {
		route.SetEmbedMode(true)
		route.Register(func(r chi.Router) {
			for _, p := range []string{"/configs", "/configs/"} {
				r.Patch(p, patchConfigs)
				r.Put(p, putConfigs)
			}
			r.Patch("/rules/disable", disableRules)
			for _, p := range []string{"/configs/geo", "/upgrade/geo"} {
				r.Post(p, updateGeo)
			}
			r.Post("/cache/fakeip/flush", flushFakeIP)
			r.Post("/restart", refuse("tpgw: restart tpgw with its service manager (systemctl restart tpgw; /etc/init.d/tpgw restart): "+
				"a restart from here would skip removing its kernel rules"))
			r.Post("/upgrade", refuse("tpgw: mihomo is built into tpgw; upgrade the tpgw package "+
				"(an upgrade from here would replace the tpgw binary with a mihomo binary)"))
		})
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"message": msg})
}

// decisionsChanged tells the gateway that flows are decided differently now.
func decisionsChanged() {
	if h := controllerHooks.Load(); h != nil && h.DecisionsChanged != nil {
		h.DecisionsChanged()
	}
}

// flushFakeIP is mihomo's POST /cache/fakeip/flush (dashboards' "flush
// fake-ip"), which also empties the mappings cache.db keeps for the pools
// tpgw keeps in memory. Those go first: a name the pools map meanwhile
// keeps its record (then stale, and overwritten when its address is handed
// on), where the other way round it could be gone from cache.db while a
// client still holds its address, which a restart might then hand to
// another name.
func flushFakeIP(w http.ResponseWriter, _ *http.Request) {
	if err := flushStoredMappings(); err != nil {
		writeError(w, http.StatusInternalServerError, "tpgw: "+err.Error())
		return
	}
	if err := flushPools(); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// flushPools empties the running config's fake-ip pools, as mihomo's
// resolver.FlushFakeIP does, but each under the pool's own lock: mihomo's
// Pool.FlushFakeIP moves the pool's position without it, a data race with
// the queries answered meanwhile (TestFlushWhileAnswering under -race).
func flushPools() error {
	pools := livePools.Load()
	if pools == nil || !poolLayout.ok {
		return resolver.FlushFakeIP()
	}
	for _, p := range *pools {
		mu := lockedPool{p}.mux()
		mu.Lock()
		err := p.FlushFakeIP()
		mu.Unlock()
		if err != nil {
			return err
		}
	}
	return nil
}

// livePools are the running config's fake-ip pools, for flushPools
// (mihomo's state is process-wide, and so is this).
var livePools atomic.Pointer[[]*fakeip.Pool]

func refuse(msg string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) { writeError(w, http.StatusForbidden, msg) }
}

func patchConfigs(w http.ResponseWriter, r *http.Request) {
	var body map[string]json.RawMessage
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		writeError(w, http.StatusBadRequest, "tpgw: body is not a JSON object: "+err.Error())
		return
	}
	var refused []string
	for k := range body {
		if !slices.Contains(patchableKeys, k) {
			refused = append(refused, k)
		}
	}
	if len(refused) > 0 {
		sort.Strings(refused)
		writeError(w, http.StatusBadRequest, fmt.Sprintf("tpgw: %s cannot be changed from here (tpgw owns the listeners, "+
			"interception and routing); this accepts %s; change the config file and reload",
			strings.Join(refused, ", "), strings.Join(patchableKeys, ", ")))
		return
	}
	var (
		mode     *tunnel.TunnelMode
		level    *mlog.LogLevel
		sniffing *bool
	)
	for k, v := range body {
		if string(v) == "null" {
			continue // unset, as in mihomo's own PATCH
		}
		var err error
		switch k {
		case "mode":
			mode = new(tunnel.TunnelMode)
			err = json.Unmarshal(v, mode)
		case "log-level":
			level = new(mlog.LogLevel)
			err = json.Unmarshal(v, level)
		case "sniffing":
			sniffing = new(bool)
			err = json.Unmarshal(v, sniffing)
		}
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("tpgw: %s: %v", k, err))
			return
		}
	}
	if level != nil {
		mlog.SetLevel(*level)
		logLevel.Store(int32(*level))
	}
	changed := false
	if mode != nil && *mode != tunnel.Mode() {
		tunnel.SetMode(*mode)
		changed = true
	}
	if sniffing != nil && *sniffing != tunnel.IsSniffing() {
		tunnel.SetSniffing(*sniffing)
		changed = true
	}
	if changed {
		decisionsChanged()
	}
	w.WriteHeader(http.StatusNoContent)
}

// disableRules turns rules off and on by index ({"3": true}), as mihomo's
// own route does; flows are decided differently from now on.
func disableRules(w http.ResponseWriter, r *http.Request) {
	var body map[int]bool
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		writeError(w, http.StatusBadRequest, "tpgw: body is not a JSON object of rule index to disabled: "+err.Error())
		return
	}
	rules := tunnel.Rules()
	changed := false
	for i, disabled := range body {
		if i < 0 || i >= len(rules) {
			continue
		}
		if rw, ok := rules[i].(C.RuleWrapper); ok && rw.IsDisabled() != disabled {
			rw.SetDisabled(disabled)
			changed = true
		}
	}
	if changed {
		decisionsChanged()
	}
	w.WriteHeader(http.StatusNoContent)
}

// updateGeo downloads the geodata files the rules use and reloads them, as
// mihomo's own route does (through mihomo's dialer, so past interception).
func updateGeo(w http.ResponseWriter, _ *http.Request) {
	if err := updater.UpdateGeoDatabases(); err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	decisionsChanged() // GEOIP and GEOSITE rules read the new data now
	w.WriteHeader(http.StatusNoContent)
}

func putConfigs(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Path    string `json:"path"`
		Payload string `json:"payload"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil && !errors.Is(err, io.EOF) {
		writeError(w, http.StatusBadRequest, "tpgw: body is not a JSON object: "+err.Error())
		return
	}
	if req.Path != "" || req.Payload != "" {
		writeError(w, http.StatusBadRequest, "tpgw: only tpgw's own config file can be applied; "+
			"change it, then reload (this request with no path and no payload, or SIGHUP)")
		return
	}
	h := controllerHooks.Load()
	if h == nil || h.Reload == nil {
		writeError(w, http.StatusServiceUnavailable, "tpgw: reload is not available")
		return
	}
	if err := h.Reload(); err != nil {
		writeError(w, http.StatusBadRequest, "tpgw: reload failed; still running with the previous config: "+err.Error())
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// controllerSettings is everything mihomo builds its external-controller
// server from (hub.ApplyConfig), as one comparable value.
func controllerSettings(cfg *config.Config) string {
	b, err := json.Marshal(struct {
		Controller *config.Controller
		TLS        *config.TLS
		Debug      bool
	}{cfg.Controller, cfg.TLS, cfg.General.LogLevel == mlog.DEBUG})
	if err != nil {
		return "unknown: " + err.Error() // never equal to a marshalled value: the server is rebuilt
	}
	return string(b)
}

// warnOpenController warns when the external-controller listens beyond the
// gateway itself with no secret: anyone on the network could then switch
// proxies and the mode, close connections and read every connection's
// destination.
func warnOpenController(c *config.Controller, log *slog.Logger) {
	if c == nil || c.Secret != "" {
		return
	}
	for key, addr := range map[string]string{"external-controller": c.ExternalController, "external-controller-tls": c.ExternalControllerTLS} {
		if addr != "" && !loopbackOnly(addr) {
			log.Warn("the external-controller is reachable from the network without a secret: anyone who reaches it can "+
				"switch proxies and the mode, close connections and see every connection; set secret, or listen on 127.0.0.1",
				"key", key, "listen", addr)
		}
	}
}

// loopbackOnly reports whether a listen address accepts connections from
// the machine itself only.
func loopbackOnly(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}
