// Command vcsim starts govmomi's vSphere API simulator (VPX model) for comb's tests.
//
// Debian's golang-github-vmware-govmomi-dev ships the simulator package but not its
// command, so this is a small launcher of our own. It is built by build.sh together
// with cbt_ext.go (compiled into package simulator). See README.md.
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	addr := flag.String("l", "127.0.0.1:0", "listen address (port 0 picks a free port)")
	username := flag.String("username", "", "login user name (empty: any non-empty name/password is accepted)")
	password := flag.String("password", "", "login password")
	tlsCert := flag.String("tlscert", "", "PEM certificate file (empty: the simulator's built-in test certificate)")
	tlsKey := flag.String("tlskey", "", "PEM private key file")
	pageBytes := flag.Int64("cbt-page-bytes", 0, "most bytes of disk one QueryChangedDiskAreas answer covers (0: whole disk)")
	trace := flag.Bool("trace", false, "log SOAP requests and responses to stderr")
	flag.Parse()

	if *pageBytes < 0 {
		log.Fatal("-cbt-page-bytes must be >= 0")
	}
	simulator.Trace = *trace

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove() // deletes the datastore directories under $TMPDIR

	model.Service.Listen = &url.URL{Host: *addr}
	if *username != "" || *password != "" {
		model.Service.Listen.User = url.UserPassword(*username, *password)
	}
	model.Service.TLS = new(tls.Config)
	if *tlsCert != "" || *tlsKey != "" {
		cert, err := tls.LoadX509KeyPair(*tlsCert, *tlsKey)
		if err != nil {
			log.Fatal(err)
		}
		model.Service.TLS.Certificates = []tls.Certificate{cert}
	}
	simulator.CombSetup(model.Service, *pageBytes)

	server := model.Service.NewServer()
	defer server.Close()

	host, port, _ := net.SplitHostPort(server.URL.Host)
	ready, _ := json.Marshal(map[string]interface{}{
		"url":  server.URL.Scheme + "://" + server.URL.Host + server.URL.Path,
		"host": host,
		"port": atoi(port),
		"pid":  os.Getpid(),
	})
	fmt.Fprintln(os.Stdout, string(ready)) // os.Stdout is unbuffered

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}
