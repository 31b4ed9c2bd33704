"""Network front ends of the agent: HTTP (Consul-compatible + native) and, later, DNS."""
