// Command consulcheck drives a Consul HTTP API with HashiCorp's own client (github.com/hashicorp/consul/api),
// making the calls Prometheus's consul_sd_configs makes (discovery/consul/consul.go), and prints what it
// found as one JSON document on stdout, so that a test can compare it with what it registered.
//
//	consulcheck -addr 127.0.0.1:8500 discover
//	    Agent().Self() for Config.Datacenter, Catalog().Services, then per service
//	    Health().ServiceMultipleTags(name, nil, false) (every instance, with its aggregated check status).
//	consulcheck -addr 127.0.0.1:8500 watch -service web -index 42 -wait 30s
//	    one blocking Health().ServiceMultipleTags with WaitIndex/WaitTime, as Prometheus watches a service.
//	consulcheck -addr 127.0.0.1:8500 watch-catalog -index 42 -wait 30s
//	    one blocking Catalog().Services, as Prometheus watches the catalog.
//
// Any error exits 1 with the client's error on stderr.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"time"

	consul "github.com/hashicorp/consul/api"
)

type instance struct {
	ID          string            `json:"id"`
	Target      string            `json:"target"` // what Prometheus scrapes: service address, else node address
	Node        string            `json:"node"`
	NodeAddress string            `json:"node_address"`
	Tags        []string          `json:"tags"`
	Meta        map[string]string `json:"meta"`
	Health      string            `json:"health"`
}

type serviceResult struct {
	Index     uint64     `json:"index"`
	Instances []instance `json:"instances"`
}

type discovery struct {
	Datacenter   string                   `json:"datacenter"`
	CatalogIndex uint64                   `json:"catalog_index"`
	Services     map[string]serviceResult `json:"services"`
}

type watchResult struct {
	Index     uint64     `json:"index"`
	ElapsedMS int64      `json:"elapsed_ms"`
	Instances []instance `json:"instances"`
	Services  []string   `json:"services,omitempty"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "consulcheck: "+format+"\n", args...)
	os.Exit(1)
}

func instancesOf(entries []*consul.ServiceEntry) []instance {
	out := make([]instance, 0, len(entries))
	for _, entry := range entries {
		host := entry.Service.Address
		if host == "" {
			host = entry.Node.Address
		}
		out = append(out, instance{
			ID:          entry.Service.ID,
			Target:      net.JoinHostPort(host, strconv.Itoa(entry.Service.Port)),
			Node:        entry.Node.Node,
			NodeAddress: entry.Node.Address,
			Tags:        entry.Service.Tags,
			Meta:        entry.Service.Meta,
			Health:      entry.Checks.AggregatedStatus(),
		})
	}
	return out
}

func datacenter(client *consul.Client) string {
	info, err := client.Agent().Self()
	if err != nil {
		fail("agent self: %v", err)
	}
	dc, ok := info["Config"]["Datacenter"].(string)
	if !ok {
		fail("invalid value '%v' for Config.Datacenter", info["Config"]["Datacenter"])
	}
	return dc
}

func discover(client *consul.Client) discovery {
	dc := datacenter(client)
	services, meta, err := client.Catalog().Services(&consul.QueryOptions{Datacenter: dc})
	if err != nil {
		fail("catalog services: %v", err)
	}
	result := discovery{Datacenter: dc, CatalogIndex: meta.LastIndex, Services: map[string]serviceResult{}}
	names := make([]string, 0, len(services))
	for name := range services {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		entries, serviceMeta, err := client.Health().ServiceMultipleTags(name, nil, false,
			&consul.QueryOptions{Datacenter: dc})
		if err != nil {
			fail("health service %s: %v", name, err)
		}
		result.Services[name] = serviceResult{Index: serviceMeta.LastIndex, Instances: instancesOf(entries)}
	}
	return result
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8500", "the agent's HTTP address")
	flag.Parse()
	if flag.NArg() < 1 {
		fail("usage: consulcheck -addr HOST:PORT discover|watch|watch-catalog [flags]")
	}
	config := consul.DefaultConfig()
	config.Address = *addr
	client, err := consul.NewClient(config)
	if err != nil {
		fail("client: %v", err)
	}
	var output any
	switch command := flag.Arg(0); command {
	case "discover":
		output = discover(client)
	case "watch", "watch-catalog":
		watch := flag.NewFlagSet(command, flag.ExitOnError)
		service := watch.String("service", "", "the service to watch (watch)")
		index := watch.Uint64("index", 0, "the blocking index (X-Consul-Index of the last answer)")
		wait := watch.Duration("wait", 30*time.Second, "the longest wait")
		_ = watch.Parse(flag.Args()[1:])
		options := &consul.QueryOptions{WaitIndex: *index, WaitTime: *wait}
		started := time.Now()
		if command == "watch" {
			if *service == "" {
				fail("watch needs -service")
			}
			entries, meta, err := client.Health().ServiceMultipleTags(*service, nil, false, options)
			if err != nil {
				fail("health service %s: %v", *service, err)
			}
			output = watchResult{Index: meta.LastIndex, ElapsedMS: time.Since(started).Milliseconds(),
				Instances: instancesOf(entries)}
		} else {
			services, meta, err := client.Catalog().Services(options)
			if err != nil {
				fail("catalog services: %v", err)
			}
			names := make([]string, 0, len(services))
			for name := range services {
				names = append(names, name)
			}
			sort.Strings(names)
			output = watchResult{Index: meta.LastIndex, ElapsedMS: time.Since(started).Milliseconds(),
				Instances: []instance{}, Services: names}
		}
	default:
		fail("unknown command %q (discover, watch, watch-catalog)", command)
	}
	if err := json.NewEncoder(os.Stdout).Encode(output); err != nil {
		fail("encode: %v", err)
	}
}
