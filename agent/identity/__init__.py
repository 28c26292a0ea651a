"""The workload's identity: its key and certificate from the CA, rotated, served to Envoy over SDS."""
