"""The multi-node tests' fixtures: hosts made as network namespaces (tests/helpers/netns_hosts.py),
with sshd on them (tests/helpers/ssh_hosts.py)."""

from tests.helpers.netns_hosts import netns_hosts  # noqa: F401  (a fixture)
from tests.helpers.ssh_hosts import ssh_hosts  # noqa: F401  (a fixture)
