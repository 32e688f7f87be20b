"""The discovery half of the wire contract: DNS-SD service type and TXT keys.

A cloud node advertises one instance of ``SERVICE_TYPE``; agents read these
TXT keys. Bump ``PROTOCOL_VERSION`` when the gRPC contract changes in a way
an older agent cannot use.
"""

SERVICE_TYPE = "_tandem._tcp.local."
PROTOCOL_VERSION = "1"

TXT_VERSION = "v"          # PROTOCOL_VERSION of the node
TXT_NODE_ID = "id"         # the node's name (its certificate's common name under TLS)
TXT_MODELS = "models"      # comma-separated model names ("..." ends a truncated list)
TXT_SLOTS = "slots"        # requests computing at once
TXT_QUEUE = "queue"        # requests waiting beyond them
TXT_FINGERPRINT = "fp"     # SHA-256 (hex) of the node's TLS certificate; empty without TLS
TXT_TLS = "tls"            # "1" or "0"
