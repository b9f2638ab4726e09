"""Mailio's world: identity, handshakes, discovery, the transfer protocol (MTP) both ways.

Knows nothing of Flask. The protocol modules (identity, did, handshakes, mtp, received, lookups,
status, peers, peer_send) know nothing of the object store either; discovery caches its answers in the
Redis connection it is given (and answers from DNS when Redis is down). Two modules are MTP's ingress,
the steps before a peer gets its answer, and use the bridge's stores (``bridge.context.Bridge``):
``accept`` (``POST /api/v1/mtp/message``: authenticate, check, store, queue) and ``answers`` (the signed
``/did`` and ``/handshake`` look-ups). The web layer calls them with bytes and maps their errors."""
