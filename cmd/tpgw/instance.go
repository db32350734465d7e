package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// One gateway per network namespace. A second `tpgw run` failed only at the
// TPROXY port ("address already in use", which said nothing of the first),
// after its engine had opened the first's state; `tpgw cleanup` removed a
// running gateway's rules, leaving it running with nothing diverted to it.
//
// A running gateway holds an abstract unix socket, and so does its watchdog.
// Abstract sockets belong to the network namespace and go with the process
// that holds them (kill -9 too), so no stale lock is ever left behind; the
// holder's PID comes from SO_PEERCRED on a connection to it.
const (
	gatewaySocket  = "@tpgw/gateway"
	watchdogSocket = "@tpgw/watchdog"
)

// watchdogWait bounds the wait for the watchdog of a gateway that died: it
// is removing that gateway's divert rules, which takes milliseconds.
const watchdogWait = 5 * time.Second

// holdGateway claims the network namespace for this gateway. A gateway that
// is running makes it fail, naming its PID. The watchdog of one that died
// is still removing its divert rules: holdGateway waits for it, so that it
// cannot remove this gateway's rules after they went in.
func holdGateway(log *slog.Logger) (net.Listener, error) {
	ln, err := holdSocket(gatewaySocket)
	if errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("tpgw%s is already running in this network namespace: stop it first, or reload it (SIGHUP)", holderPID(gatewaySocket))
	}
	if err != nil {
		return nil, fmt.Errorf("instance lock %s: %w", gatewaySocket, err)
	}
	if err := waitWatchdog(log); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// waitWatchdog waits, bounded, for the watchdog of a tpgw that died: it is
// removing that gateway's divert rules.
func waitWatchdog(log *slog.Logger) error {
	holder := holderPID(watchdogSocket)
	if holder == "" {
		return nil
	}
	log.Info("waiting for the watchdog of a tpgw that died to finish", "watchdog", holder)
	deadline := time.Now().Add(watchdogWait)
	for holderPID(watchdogSocket) != "" {
		if time.Now().After(deadline) {
			return fmt.Errorf("the watchdog%s of a tpgw that died is still running after %v", holder, watchdogWait)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// requirePrivileges fails early, saying what is missing, when the process
// cannot change the kernel's network state: the start used to fail at the
// backend probe with netlink's "operation not permitted".
func requirePrivileges() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return nil // cannot tell; the first privileged step will say
	}
	if data[0].Effective&(1<<unix.CAP_NET_ADMIN) == 0 {
		return errors.New("not privileged: needs root, or the capabilities CAP_NET_ADMIN and CAP_NET_RAW (it changes the kernel's rules, routes and sysctls)")
	}
	return nil
}

// refuseIfRunning fails when a gateway runs in this network namespace: its
// own exit removes its rules, and removing them under it would leave it
// running with nothing diverted to it.
func refuseIfRunning() error {
	if holder := holderPID(gatewaySocket); holder != "" {
		return fmt.Errorf("tpgw%s is running in this network namespace: stop it, and its exit removes its rules (cleanup is for what a crashed run left)", holder)
	}
	return nil
}

// holdSocket listens on an abstract unix socket and answers every connection
// by closing it (a connection is only asked for the holder's PID).
func holdSocket(name string) (net.Listener, error) {
	ln, err := net.Listen("unix", name)
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln, nil
}

// holderPID is " (pid N)" for the process holding the abstract socket name,
// " (pid unknown)" if it cannot be read, and "" if nothing holds it.
func holderPID(name string) string {
	c, err := net.DialTimeout("unix", name, time.Second)
	if err != nil {
		return ""
	}
	defer c.Close()
	pid := " (pid unknown)"
	if raw, err := c.(*net.UnixConn).SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) {
			if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
				pid = fmt.Sprintf(" (pid %d)", cred.Pid)
			}
		})
	}
	return pid
}
