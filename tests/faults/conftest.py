from tests.delivery.conftest import make_client

__all__ = ["make_client"]
