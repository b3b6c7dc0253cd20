"""Offline replay: a capture through the same BPF programs and the same verdict engine as a live
attachment (docs/replay.md). capture.py reads pcap and pcapng; run.py runs the packets."""
