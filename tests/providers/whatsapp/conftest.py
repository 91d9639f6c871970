from tests.support.messaging import http  # noqa: F401  (fixture)
