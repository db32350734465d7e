// Package tsock holds the socket plumbing that tpgw's TPROXY listeners (relay)
// and its DNS server (dns) share: transparent sockets, the original
// destination of a diverted datagram, reply sockets bound to an address that
// is not the host's, and the network namespace such sockets are made in.
//
// # Why transparent sockets
//
// nftables' tproxy hands a LAN packet to a local socket without rewriting it:
// its destination is still the remote host the client addressed (say
// 203.0.113.2:53). The kernel delivers such a packet only to a socket with
// IP_TRANSPARENT (IPV6_TRANSPARENT), and only such a socket may bind to, and
// send from, an address that is not one of the host's. Setting it needs
// CAP_NET_ADMIN; SetTransparent marks that failure with ErrNotPermitted.
//
// # Replies come from the original destination
//
// A TCP flow needs nothing more: the accepted socket's local address is the
// original destination. UDP has one listening socket for every flow, so the
// listener asks for each datagram's destination (SetRecvOrigDst) and recvmsg
// returns it as an IP_ORIGDSTADDR or IPV6_ORIGDSTADDR control message, which
// ParseOrigDst reads without trusting its lengths. A UDP client (and any NAT
// or firewall on the way) accepts a reply only from the address and port it
// sent to, so replies leave from a socket bound there (ListenReply):
// transparent to bind a remote address, SO_REUSEADDR so that many sockets
// share it, and never connected, so that the tproxy lookup, which prefers an
// established socket, never gives it the client's next datagram. Where a
// socket of the host holds the port without SO_REUSEADDR, the bind fails
// with EADDRINUSE, and RawUDP sends the reply with the same source from a raw
// socket instead. TryBind
// tells the host's own addresses from remote ones. See
// Documentation/networking/tproxy.rst in the kernel tree.
//
// # Network namespaces
//
// Reply sockets are made later than the listener, from whichever goroutine
// has a reply to send. Netns records the namespace of the thread that opened
// the listener and runs the socket's creation there. In tpgw the whole
// process lives in one namespace and this costs one stat(2); it matters to
// tests, which open listeners on a thread locked inside a throwaway namespace
// (testnet's NS.Do) while replies are sent from threads still in the host's.
//
// # One listener for every client
//
// The relay's and the DNS server's UDP listeners each take every client's
// datagrams. RaiseRcvBuf gives them a 4 MiB receive buffer instead of the
// default of about 208 KiB, which the kernel fills within a millisecond of
// the reader not being scheduled, and then drops what arrives.
//
// # Raw system calls
//
// BatchReader and BatchWriter call recvmmsg and sendmmsg with MSG_DONTWAIT
// as raw system calls (unix.RawSyscall6), outside the Go runtime's syscall
// bookkeeping; waiting for a socket to become readable or writable still
// goes through the runtime's poller (RawConn.Read and Write). A system call
// that cannot wait gains nothing from that bookkeeping, and it cost: the
// first one after the process had gone idle (every P idle, between two
// bursts of datagrams) woke the scheduler's monitor thread (sysmon), which
// then slept and woke every 20 µs for a millisecond before backing off.
// Under a steady stream of queries that happened thousands of times a
// second. engine's DIRECT relay does the same for its
// reads, writes and splices.
//
// # Sockets that only send
//
// Reply sockets (OpenReply) are never read, so they stay out of the
// runtime's poller: a plain blocking socket, sent on with a raw sendto or
// sendmmsg with MSG_DONTWAIT, and, only when its send buffer is full, with
// a system call that waits (at most SO_SNDTIMEO, 1 s). The poller registers
// every socket for writability too, edge-triggered, and the kernel then
// wakes it each time a datagram the socket sent is freed (sock_wfree, on
// veths inside the sender's own send): nothing ever waited for that room.
// In the bench's hijacked DNS run (every answer leaves from a reply socket)
// that was 3% of the machine's samples under tpgw's sendmmsg, and taking
// the reply sockets out of the poller cut the gateway's context switches
// per query from 0.16-0.21 to 0.06-0.11 and its epoll_pwait calls from
// 0.13-0.24 to 0.08-0.13 (perf stat, three alternating rounds). A
// ReplySocket's RWMutex keeps Close from closing the descriptor under a
// send, which could otherwise reach a socket opened later with the same
// number.
package tsock
