"""The fleet: decisions shared between gateways (CrowdSec bans), and what the kernel must hold of them."""
