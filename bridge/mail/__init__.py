"""RFC 5322: the facts we read from a message and sender authentication. No Flask, no storage."""
