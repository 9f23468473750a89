"""The load tests start real servers the way the end-to-end tests do, and mail to the
SMTP server the fault tests use."""

from tests.e2e.conftest import serve
from tests.faults.conftest import smtp_server

__all__ = ["serve", "smtp_server"]
