"""The email tests' real SMTP server: offers are shown in emails."""

from tests.email.conftest import smtp as smtp
