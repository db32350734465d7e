package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestCommandHelp(t *testing.T) {
	for _, cmd := range []string{"run", "check", "rules", "cleanup", "explain"} {
		for _, flag := range []string{"-h", "--help", "-help"} {
			var stdout, stderr bytes.Buffer
			code := realMain([]string{cmd, flag}, &stdout, &stderr)
			out := stdout.String()
			if code != 0 || stderr.Len() != 0 || !strings.HasPrefix(out, "Usage: tpgw "+cmd+" ") || !strings.Contains(out, "\nFlags:\n  -c FILE") {
				t.Errorf("tpgw %s %s: exit %d, stdout %q, stderr %q; want exit 0 and the command's usage on stdout", cmd, flag, code, out, stderr.String())
			}
		}
	}
	// Help wins over a missing -c, as it does in other tools.
	var stdout, stderr bytes.Buffer
	if code := realMain([]string{"explain", "--src", "192.168.77.2", "-h"}, &stdout, &stderr); code != 0 || !strings.HasPrefix(stdout.String(), "Usage: tpgw explain ") {
		t.Errorf("explain --src A -h: exit %d, stdout %q", code, stdout.String())
	}
}

func TestUnknownFlag(t *testing.T) {
	var stdout, stderr bytes.Buffer
	code := realMain([]string{"run", "-config", "x.yaml"}, &stdout, &stderr)
	want := "tpgw run: flag provided but not defined: -config (tpgw run -h shows the flags)\n"
	if code != 2 || stderr.String() != want || stdout.Len() != 0 {
		t.Errorf("exit %d, stderr %q, stdout %q; want exit 2, stderr %q", code, stderr.String(), stdout.String(), want)
	}
}
