// Package relay owns tpgw's TPROXY listeners.
//
// The kernel (rules installed by netcfg) diverts LAN flows to tproxy-port
// without rewriting them. A listener with IP_TRANSPARENT may accept
// connections addressed to any IP, so the accepted socket's local address is
// the flow's original destination (TCP). The relay turns each accepted flow
// into (source, original destination) and hands it to the engine through the
// small TCPHandler interface declared here, so the relay can be tested
// without mihomo.
package relay
