"""Delivery: the worker (claims, retries, attempts) and webhook events → delivery status."""
