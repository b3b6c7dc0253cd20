"""The ``hybridctl`` command-line interface (click). Calls the library; the only place that prints."""
