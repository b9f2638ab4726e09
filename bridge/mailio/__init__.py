"""Mailio's world: identity, handshakes, discovery, later MTP.

Knows nothing of Flask or the object store. Discovery caches its answers in the Redis connection
it is given (and answers from DNS when Redis is down); nothing else here touches Redis."""
