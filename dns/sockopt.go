package dns

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// errNotPermitted marks a failure to set IP_TRANSPARENT for lack of
// CAP_NET_ADMIN, which Listen turns into a warning and a plain socket.
var errNotPermitted = errors.New("needs CAP_NET_ADMIN")

// setTransparent sets IP_TRANSPARENT, and IPV6_TRANSPARENT on a v6 or
// dual-stack socket. Without it the kernel neither hands the socket packets
// that nftables' tproxy diverted to it (their destination is not local) nor
// lets it bind to, and send from, an address that is not the host's.
func setTransparent(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1); err != nil {
		if errors.Is(err, unix.EPERM) {
			return fmt.Errorf("set IP_TRANSPARENT: %w (%w)", err, errNotPermitted)
		}
		return fmt.Errorf("set IP_TRANSPARENT: %w", err)
	}
	// ENOPROTOOPT on a pure v4 socket: nothing to do there.
	if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1); err != nil && !errors.Is(err, unix.ENOPROTOOPT) {
		return fmt.Errorf("set IPV6_TRANSPARENT: %w", err)
	}
	return nil
}

// setRecvOrigDst asks for the original destination of each datagram
// (IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control messages): for a TPROXYed query
// it is the DNS server the client asked, which the reply must come from.
func setRecvOrigDst(fd int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_RECVORIGDSTADDR, 1); err != nil {
		return fmt.Errorf("set IP_RECVORIGDSTADDR: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_RECVORIGDSTADDR, 1); err != nil && !errors.Is(err, unix.ENOPROTOOPT) {
		return fmt.Errorf("set IPV6_RECVORIGDSTADDR: %w", err)
	}
	return nil
}

// control runs fn on the raw socket before bind, for net.ListenConfig.
func control(c syscall.RawConn, fn func(fd int) error) error {
	var serr error
	if err := c.Control(func(fd uintptr) { serr = fn(int(fd)) }); err != nil {
		return err
	}
	return serr
}

// parseOrigDst returns the original destination carried in the control
// messages of one datagram, or an invalid AddrPort if there is none. oob comes
// from the kernel, but it is parsed defensively all the same: lengths are
// checked before every read and nothing here can panic.
func parseOrigDst(oob []byte) netip.AddrPort {
	for len(oob) >= unix.SizeofCmsghdr {
		hlen, level, typ := cmsgHeader(oob)
		if hlen < uint64(unix.CmsgLen(0)) || hlen > uint64(len(oob)) {
			return netip.AddrPort{}
		}
		data := oob[unix.CmsgLen(0):hlen]
		switch {
		case level == unix.SOL_IP && typ == unix.IP_ORIGDSTADDR && len(data) >= unix.SizeofSockaddrInet4:
			// struct sockaddr_in: family, port (network order), addr.
			port := binary.BigEndian.Uint16(data[2:4])
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte(data[4:8])), port)
		case level == unix.SOL_IPV6 && typ == unix.IPV6_ORIGDSTADDR && len(data) >= unix.SizeofSockaddrInet6:
			// struct sockaddr_in6: family, port, flowinfo, addr, scope_id.
			port := binary.BigEndian.Uint16(data[2:4])
			addr := netip.AddrFrom16([16]byte(data[8:24])).Unmap()
			if scope := binary.NativeEndian.Uint32(data[24:28]); scope != 0 && addr.Is6() {
				// A numeric zone is understood by package net (e.g. fe80::1%2).
				addr = addr.WithZone(strconv.FormatUint(uint64(scope), 10))
			}
			return netip.AddrPortFrom(addr, port)
		}
		next := unix.CmsgSpace(int(hlen) - unix.CmsgLen(0))
		if next <= 0 || next > len(oob) {
			return netip.AddrPort{}
		}
		oob = oob[next:]
	}
	return netip.AddrPort{}
}

// cmsgHeader decodes struct cmsghdr, whose length field is a size_t: 8 bytes
// on 64-bit platforms, 4 on 32-bit ones (many OpenWrt routers).
func cmsgHeader(b []byte) (hlen uint64, level, typ int32) {
	if unix.SizeofCmsghdr == 16 {
		return binary.NativeEndian.Uint64(b[0:8]), int32(binary.NativeEndian.Uint32(b[8:12])), int32(binary.NativeEndian.Uint32(b[12:16]))
	}
	return uint64(binary.NativeEndian.Uint32(b[0:4])), int32(binary.NativeEndian.Uint32(b[4:8])), int32(binary.NativeEndian.Uint32(b[8:12]))
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
