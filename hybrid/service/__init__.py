"""hybrid as a service: the configuration file and the supervisor behind `hybridctl run`."""
