"""hybrid: XDP/tc pre-classification in front of a Python NFQUEUE verdict engine.

The library never prints; the CLI (``cli/``) turns its results and errors into output.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
