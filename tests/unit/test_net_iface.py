"""The network interface gloo and NCCL use: the route to the master address (checked on two hosts
made as network namespaces, linked by a veth pair in 198.18.0.0/15), ``parallel.net_iface``, and the
variables a user exported left alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from megaring.distributed.net_iface import IFNAME_VARS, choose_interface, net_iface_problems, route_interface


def test_the_route_to_loopback_is_lo_and_unknown_hosts_give_none():
    assert route_interface("127.0.0.1") == "lo"
    assert route_interface("no-such-host.invalid") is None


def test_the_choice_is_exported_unless_the_user_exported_one(monkeypatch):
    for var in IFNAME_VARS:  # set first, so that monkeypatch restores them (choose_interface exports them)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    assert choose_interface("127.0.0.1", None, announce=True) == "lo"
    assert [os.environ[v] for v in IFNAME_VARS] == ["lo", "lo"]
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    assert choose_interface("127.0.0.1", "lo", announce=False) == "lo"
    assert (os.environ["GLOO_SOCKET_IFNAME"], os.environ["NCCL_SOCKET_IFNAME"]) == ("lo", "ib0")


def test_an_interface_this_host_lacks_is_a_config_error():
    from megaring.errors import ConfigError
    from megaring.train.config_checks import validate
    from tests.helpers.train_cfg import make_cfg

    assert net_iface_problems("lo") == [] and net_iface_problems(None) == []
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(extra=("parallel.net_iface=eth9",)), world_size=1)
    assert "parallel.net_iface='eth9' is not an interface of" in str(err.value) and "'lo'" in str(err.value)


@pytest.fixture
def two_hosts():
    """Namespaces a (198.18.0.1) and b (198.18.0.2) joined by one veth pair; removed afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    a, b = f"mra{tag}", f"mrb{tag}"

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip("link", "add", f"va{tag}", "netns", a, "type", "veth", "peer", "name", f"vb{tag}", "netns", b)
        for ns, dev, addr in ((a, f"va{tag}", "198.18.0.1/30"), (b, f"vb{tag}", "198.18.0.2/30")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as err:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        pytest.skip(f"network namespaces cannot be made here: {err.stderr.decode().strip()}")
    yield a, f"va{tag}"
    for ns in (a, b):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_the_route_to_another_host_is_its_link(two_hosts):
    ns, link = two_hosts
    code = ("from megaring.distributed.net_iface import route_interface as r; "
            "print(r('198.18.0.2'), r('127.0.0.1'), r('198.19.0.9'))")
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()}, check=True).stdout.split()
    assert out == [link, "lo", "None"]  # 198.19.0.9: no route in the namespace
