"""The load tests start real servers the way the end-to-end tests do."""

from tests.e2e.conftest import serve

__all__ = ["serve"]
