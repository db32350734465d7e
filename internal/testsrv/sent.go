package testsrv

import (
	"fmt"
	"net"
	"time"

	"github.com/tpgw/tpgw/internal/tsock"
)

// WaitSent waits, up to timeout, until c's send queue is empty: its peer's
// kernel has acknowledged every byte (tsock.SendQueued). A test server that resets
// its connection on purpose waits for this first, since a reset discards
// what the socket still holds.
func WaitSent(c *net.TCPConn, timeout time.Duration) error {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		queued, err := tsock.SendQueued(c)
		if err != nil {
			return err
		}
		if queued == 0 {
			return nil
		}
	}
	return fmt.Errorf("testsrv: send queue not empty after %v", timeout)
}
