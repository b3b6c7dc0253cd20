"""Lab and benchmark tooling: network-namespace testbeds, lab servers, the flood sender, the benchmarks and the demo. Nothing outside hybrid.lab imports it."""
