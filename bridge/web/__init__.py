"""Thin Flask blueprints: one module per ingress (Postal, the owner API) plus operations.

A view verifies the caller, hands bytes or ids to code that knows nothing of Flask, and maps
the bridge's errors to a deliberate status with a short, secret-free body. No business logic here.
"""
