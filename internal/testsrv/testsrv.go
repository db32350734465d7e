// Package testsrv holds the accept loop the tests' small TCP servers share.
package testsrv

import "net"

// ServeEach accepts on ln until it is closed and runs handle for each
// connection on its own goroutine, closing the connection when handle
// returns.
func ServeEach(ln net.Listener, handle func(net.Conn)) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
}
