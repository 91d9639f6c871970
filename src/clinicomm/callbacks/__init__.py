"""Status callbacks: each delivery status change POSTed, signed, to the caller.

- `signing`: the `Clinicomm-Signature` scheme (sign and verify; no clinicomm imports, so the
  HTTP client shares it).
- `targets`: where a message's callbacks go (fixed at accept) and the destination check.
- `queue`: the durable queue (`callback_events`): enqueue at status writes, claim in order.
- `sender`: the loop that POSTs them with exponential backoff for up to 24 h.
"""
