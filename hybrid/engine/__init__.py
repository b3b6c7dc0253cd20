"""The verdict engine: packet decoding, rules, segment joining, rewrite, the per-queue loop and the way engine processes are started."""
