// Package e2e holds tpgw's end-to-end tests: the real tpgw binary runs in the
// gateway namespace of a throwaway topology (internal/testnet), with real
// clients (curl, dig) and real peers (an HTTP server, ss-server, dnsmasq).
// The address the upstream reports tells the path a request took.
package e2e
