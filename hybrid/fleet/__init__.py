"""hybrid in a CrowdSec deployment: bans from the Local API, shared blocks to it."""
