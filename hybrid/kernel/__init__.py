"""The kernel's interfaces: bpf() and libbpf, bpffs, netlink (links, tc, XDP), netfilter rules, NFQUEUE set-up, and the ABI shared with bpf/."""
