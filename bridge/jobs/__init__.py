"""RQ job functions: small, idempotent, and given ids (or nothing), never objects.

A job may run twice (a worker dies, an operator requeues it): each one re-reads the object
store, decides again, and writes the same result. Jobs get their stores from
``bridge.context.current()``, built by the same code as the web app's.
"""
