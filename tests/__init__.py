import pytest

# conftest imports the secret scan's plugin module before pytest loads it (`pytest_plugins`),
# and pytest warns about a plugin it can no longer rewrite unless told about it first.
pytest.register_assert_rewrite("tests.secret_scan")
