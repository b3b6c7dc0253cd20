"""hybrid's kernel side as one unit: the attach options, compiling and loading the BPF programs, attach/detach as a transaction, typed access to the pinned maps."""
