"""kagent.config: kernel command line, TOML, environment and flags → AgentConfig."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kagent import config
from kagent.config import AgentConfig, load, parse_bool, parse_cmdline, parse_go_duration

DEFAULT = AgentConfig()


def cmd(text: str) -> AgentConfig:
    """load() from a kernel command line alone (no environment)."""
    return load(cmdline=text, environ={})


def write(tmp_path, text: str | bytes, name: str = "agent.toml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


# --- value parsers -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("1", True), ("0", False), ("true", True), ("false", False), ("TRUE", True),
    ("False", False), ("yes", True), ("no", False), ("On", True), ("off", False),
])
def test_parse_bool(text, expected):
    assert parse_bool(text) is expected


@pytest.mark.parametrize("text", ["", "2", "-1", "y", "n", "truee", "enable", "1.0", "t"])
def test_parse_bool_invalid(text):
    with pytest.raises(ValueError):
        parse_bool(text)


@pytest.mark.parametrize("text,seconds", [
    ("10s", 10.0), ("1m30s", 90.0), ("1.5h", 5400.0), ("500ms", 0.5), ("2m3s4ms", 123.004),
    ("1h2m", 3720.0), ("0", 0.0), ("+0", 0.0), ("-1s", -1.0), ("+5s", 5.0), (".5s", 0.5),
    ("5.s", 5.0), ("1ns", 1e-9), ("1us", 1e-6), ("1µs", 1e-6), ("1μs", 1e-6),
    ("1.0000000009s", 1.0),  # truncated to the nanosecond, like Go
    ("2562047h", 2562047 * 3600.0),
])
def test_parse_go_duration(text, seconds):
    assert parse_go_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("text", [
    "", "abc", "10", "1.5", "3x", "1h-1m", "s", ".s", "1", "00", "1m5", "1.5.5s", " 1s",
    "1s ", "--1s", "1hm", "1e3s", "2562048h", "9" * 30 + "s", "1 s",
])
def test_parse_go_duration_invalid(text):
    with pytest.raises(ValueError):
        parse_go_duration(text)


@pytest.mark.parametrize("text,seconds", [("10", 10.0), ("1.5", 1.5), ("0.25", 0.25),
                                          ("10s", 10.0), ("-3", -3.0)])
def test_parse_duration_bare_seconds(text, seconds):
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text,expected", [
    ("trace", "trace"), ("debug", "debug"), ("info", "info"), ("warn", "warning"),
    ("warning", "warning"), ("error", "error"), ("fatal", "critical"), ("panic", "critical"),
    ("critical", "critical"), ("DEBUG", "debug"),
])
def test_normalise_log_level(text, expected):
    assert config.normalise_log_level(text) == expected


@pytest.mark.parametrize("addr", [
    "vsock://-1:1024", "vsock://3:1024", "vsock://4294967295:2048", "unix:///run/agent.sock",
    "unix://@kagent", "serial:///dev/vport0p1", "serial://agent.channel.0",
])
def test_server_addr_valid(addr):
    assert config.validate_server_addr(addr) == addr


@pytest.mark.parametrize("addr,why", [
    ("", "no scheme"), ("vsock:1024", "no scheme"), ("tcp://1.2.3.4:80", "unsupported address scheme"),
    ("hvsock:///run/vm.sock:1024", "client-side"), ("mock:///run/a.sock", "client-side"),
    ("vsock://-1", "CID:PORT"),
    ("vsock://x:1024", "invalid vsock CID"), ("vsock://-2:1024", "invalid vsock CID"),
    ("vsock://3:0", "out of range"), ("vsock://3:4294967295", "out of range"),
    ("vsock://4294967296:1", "CID 4294967296 out of range"), ("unix://", "unix:///"),
    ("unix://relative", "unix:///"), ("unix:///", "unix:///"), ("unix://@", "abstract"),
    ("unix:///" + "x" * 200, "longer than"), ("unix:///a\0b", "NUL"),
    ("serial://", "serial:///dev"), ("serial://bad name", "serial:///dev"),
    ("serial:///dev/", "serial:///dev"), ("VSOCK://-1:1024", "unsupported address scheme"),
])
def test_server_addr_invalid(addr, why):
    with pytest.raises(ValueError, match=why):
        config.validate_server_addr(addr)


# --- the kernel command line, option by option -----------------------------------------------

# (cmdline, field, expected value): valid and edge values.
VALID = [
    ("agent.log=debug", "log_level", "debug"),
    ("agent.log=trace", "log_level", "trace"),
    ("agent.log=warn", "log_level", "warning"),
    ("agent.log=fatal", "log_level", "critical"),
    ("agent.log=panic", "log_level", "critical"),
    ("agent.log=ERROR", "log_level", "error"),
    ("agent.devmode", "dev_mode", True),
    ("agent.devmode=1", "dev_mode", True),
    ("agent.devmode=off", "dev_mode", False),
    ("agent.trace", "tracing", True),
    ("agent.trace=true", "tracing", True),
    ("agent.trace=0", "tracing", False),
    ("agent.debug_console", "debug_console", True),
    ("agent.debug_console=yes", "debug_console", True),
    ("agent.debug_console=false", "debug_console", False),
    ("agent.debug_console_vport=1026", "debug_console_vport", 1026),
    ("agent.debug_console_vport=0", "debug_console_vport", 0),
    ("agent.debug_console_vport=+7", "debug_console_vport", 7),
    ("agent.log_vport=1025", "log_vport", 1025),
    ("agent.log_vport=4294967294", "log_vport", 4294967294),
    ("agent.passfd_listener_port=1027", "passfd_listener_port", 1027),
    ("agent.passfd_listener_port=0", "passfd_listener_port", 0),
    ("agent.server_addr=vsock://3:2048", "server_addr", "vsock://3:2048"),
    ("agent.server_addr=unix:///run/a=b.sock", "server_addr", "unix:///run/a=b.sock"),
    ("agent.server_addr=unix://@kagent", "server_addr", "unix://@kagent"),
    ("agent.server_addr=serial:///dev/vport1p1", "server_addr", "serial:///dev/vport1p1"),
    ("agent.server_addr=serial://agent.channel.0", "server_addr", "serial://agent.channel.0"),
    ("agent.hotplug_timeout=10s", "hotplug_timeout", 10.0),
    ("agent.hotplug_timeout=1m30s", "hotplug_timeout", 90.0),
    ("agent.hotplug_timeout=500ms", "hotplug_timeout", 0.5),
    ("agent.hotplug_timeout=10", "hotplug_timeout", 10.0),
    ("agent.hotplug_timeout=1.5", "hotplug_timeout", 1.5),
    ("agent.hotplug_timeout=1ns", "hotplug_timeout", 1e-9),
    ("agent.unified_cgroup_hierarchy=1", "unified_cgroup_hierarchy", True),
    ("agent.unified_cgroup_hierarchy=true", "unified_cgroup_hierarchy", True),
    ("agent.unified_cgroup_hierarchy=0", "unified_cgroup_hierarchy", False),
    ("agent.unified_cgroup_hierarchy=false", "unified_cgroup_hierarchy", False),
    ("agent.unified_cgroup_hierarchy", "unified_cgroup_hierarchy", True),
    ("systemd.unified_cgroup_hierarchy=1", "unified_cgroup_hierarchy", True),
    ("systemd.unified_cgroup_hierarchy=no", "unified_cgroup_hierarchy", False),
    ("cgroup_no_v1=all", "unified_cgroup_hierarchy", True),
    ("agent.container_pipe_size=1048576", "container_pipe_size", 1048576),
    ("agent.container_pipe_size=0", "container_pipe_size", 0),
    ("agent.container_pipe_size=2147483647", "container_pipe_size", 2147483647),
    ("agent.config_file=/etc/kagent.toml", "config_file", "/etc/kagent.toml"),
    ("agent.policy_file=/etc/kata-opa/p.rego", "policy_file", "/etc/kata-opa/p.rego"),
    ("agent.cgroup_parent=kata", "cgroup_parent", "kata"),
    ("agent.cgroup_parent=/a/b/", "cgroup_parent", "a/b"),
    ("agent.ttrpc_max_connections=8", "ttrpc_max_connections", 8),
    ("agent.ttrpc_max_connections=1048576", "ttrpc_max_connections", 1 << 20),
    ("agent.ttrpc_max_inflight=1", "ttrpc_max_inflight", 1),
    ("agent.ttrpc_max_inflight_total=100", "ttrpc_max_inflight_total", 100),
    ("agent.ttrpc_max_inflight_bytes=4096", "ttrpc_max_inflight_bytes", 4096),
    ("agent.ttrpc_max_inflight_bytes=1073741824", "ttrpc_max_inflight_bytes", 1 << 30),
    ("agent.ttrpc_max_message_size=65536", "ttrpc_max_message_size", 65536),
    ("agent.ttrpc_max_message_size=4194304", "ttrpc_max_message_size", 4 << 20),
    ("agent.ttrpc_frame_timeout=5s", "ttrpc_frame_timeout", 5.0),
    ("agent.ttrpc_frame_timeout=2", "ttrpc_frame_timeout", 2.0),
]


@pytest.mark.parametrize("text,field,expected", VALID)
def test_cmdline_valid(text, field, expected):
    values, warnings = parse_cmdline(text)
    assert warnings == []
    assert values[field] == expected


# (cmdline, field, warning fragment): invalid values keep the default, with a warning.
INVALID = [
    ("agent.log=loud", "log_level", "invalid log level"),
    ("agent.log=", "log_level", "invalid log level"),
    ("agent.log", "log_level", "missing value"),
    ("agent.devmode=maybe", "dev_mode", "invalid boolean"),
    ("agent.trace=2", "tracing", "invalid boolean"),
    ("agent.debug_console=", "debug_console", "invalid boolean"),
    ("agent.debug_console_vport=-1", "debug_console_vport", "must not be negative"),
    ("agent.debug_console_vport=abc", "debug_console_vport", "invalid port number"),
    ("agent.debug_console_vport=1.5", "debug_console_vport", "invalid port number"),
    ("agent.debug_console_vport=0x400", "debug_console_vport", "invalid port number"),
    ("agent.log_vport=4294967295", "log_vport", "out of range"),
    ("agent.log_vport=", "log_vport", "invalid port number"),
    ("agent.passfd_listener_port=-1027", "passfd_listener_port", "must not be negative"),
    ("agent.passfd_listener_port=99999999999999999999999", "passfd_listener_port", "invalid"),
    ("agent.server_addr=tcp://0:1", "server_addr", "unsupported address scheme"),
    ("agent.server_addr=hvsock:///x:2", "server_addr", "client-side"),
    ("agent.server_addr=vsock://-1:abc", "server_addr", "invalid port"),
    ("agent.server_addr=", "server_addr", "no scheme"),
    ("agent.server_addr", "server_addr", "missing value"),
    ("agent.hotplug_timeout=abc", "hotplug_timeout", "invalid duration"),
    ("agent.hotplug_timeout=", "hotplug_timeout", "invalid duration"),
    ("agent.hotplug_timeout=0", "hotplug_timeout", "greater than zero"),
    ("agent.hotplug_timeout=0s", "hotplug_timeout", "greater than zero"),
    ("agent.hotplug_timeout=-1s", "hotplug_timeout", "greater than zero"),
    ("agent.hotplug_timeout=-5", "hotplug_timeout", "greater than zero"),
    ("agent.hotplug_timeout=3x", "hotplug_timeout", "invalid duration"),
    ("agent.hotplug_timeout=1h-1m", "hotplug_timeout", "invalid duration"),
    ("agent.hotplug_timeout=4jbsdja", "hotplug_timeout", "invalid duration"),
    ("agent.hotplug_timeout=1e400", "hotplug_timeout", "invalid duration"),
    ("agent.unified_cgroup_hierarchy=2", "unified_cgroup_hierarchy", "invalid boolean"),
    ("systemd.unified_cgroup_hierarchy=maybe", "unified_cgroup_hierarchy", "invalid boolean"),
    ("agent.container_pipe_size=-1", "container_pipe_size", "must not be negative"),
    ("agent.container_pipe_size=1M", "container_pipe_size", "invalid size"),
    ("agent.container_pipe_size=2147483648", "container_pipe_size", "out of range"),
    ("agent.config_file=", "config_file", "empty path"),
    ("agent.cgroup_parent=../x", "cgroup_parent", "invalid cgroup name"),
    ("agent.cgroup_parent=/", "cgroup_parent", "invalid cgroup name"),
    ("agent.ttrpc_max_connections=0", "ttrpc_max_connections", "must be at least 1"),
    ("agent.ttrpc_max_connections=-3", "ttrpc_max_connections", "must not be negative"),
    ("agent.ttrpc_max_connections=1048577", "ttrpc_max_connections", "out of range"),
    ("agent.ttrpc_max_inflight=many", "ttrpc_max_inflight", "invalid number"),
    ("agent.ttrpc_max_inflight_total=0", "ttrpc_max_inflight_total", "must be at least 1"),
    ("agent.ttrpc_max_inflight_bytes=100", "ttrpc_max_inflight_bytes", "must be at least 4096"),
    ("agent.ttrpc_max_message_size=4194305", "ttrpc_max_message_size", "out of range"),
    ("agent.ttrpc_max_message_size=10", "ttrpc_max_message_size", "must be at least 4096"),
    ("agent.ttrpc_frame_timeout=0", "ttrpc_frame_timeout", "greater than zero"),
    ("agent.ttrpc_frame_timeout=soon", "ttrpc_frame_timeout", "invalid duration"),
]


@pytest.mark.parametrize("text,field,fragment", INVALID)
def test_cmdline_invalid_keeps_default(text, field, fragment):
    values, warnings = parse_cmdline(text)
    assert field not in values
    assert len(warnings) == 1 and fragment in warnings[0], warnings
    assert warnings[0].startswith(text.partition("=")[0])
    cfg = cmd(text)
    assert getattr(cfg, field) == getattr(DEFAULT, field)
    assert cfg.warnings == tuple(warnings)


def test_hotplug_warning_text():
    assert cmd("agent.hotplug_timeout=abc").warnings == (
        "agent.hotplug_timeout=abc: invalid duration, using 3s",
    )


def test_invalid_value_keeps_the_earlier_valid_one():
    cfg = cmd("agent.hotplug_timeout=10s agent.hotplug_timeout=abc")
    assert cfg.hotplug_timeout == 10.0
    assert cfg.warnings == ("agent.hotplug_timeout=abc: invalid duration, using 10s",)


@pytest.mark.parametrize("text", [
    "console=ttyS0", "quiet", "root=/dev/vda1 rw", "init=/usr/lib/systemd/systemd",
    "cgroup_no_v1=memory", "cgroup_no_v1", "systemd.log_level=debug", "agentx.log=debug",
    "--", "agent_log=debug", "",
])
def test_non_agent_tokens_ignored_silently(text):
    assert cmd(text) == DEFAULT


@pytest.mark.parametrize("text,warning", [
    ("agent.foo", "unknown option agent.foo"),
    ("agent.foo=1", "unknown option agent.foo"),
    ("agent.", "unknown option agent."),
    ("agent.log_level=debug", "unknown option agent.log_level"),
    ("agent.https_proxy=http://proxy:3128", "unsupported upstream option agent.https_proxy"),
    ("agent.mem_agent_memcg_swap=1", "unsupported upstream option agent.mem_agent_memcg_swap"),
])
def test_unknown_agent_options_warn(text, warning):
    cfg = cmd(text)
    assert dataclasses.replace(cfg, warnings=()) == DEFAULT
    assert len(cfg.warnings) == 1 and cfg.warnings[0].startswith(warning)


def test_later_tokens_override_earlier():
    cfg = cmd("agent.log=debug agent.log=error agent.log_vport=1 agent.log_vport=2")
    assert (cfg.log_level, cfg.log_vport) == ("error", 2)


def test_cmdline_whitespace_and_quotes():
    cfg = cmd('  console=ttyS0\tagent.log=debug\n agent.server_addr="unix:///run/a b"  \n')
    assert cfg.log_level == "debug"
    assert cfg.server_addr == "unix:///run/a b"
    assert cfg.warnings == ()


def test_a_realistic_kata_cmdline():
    text = ("tsc=reliable no_timer_check rcupdate.rcu_expedited=1 i8042.direct=1 "
            "console=hvc0 quiet panic=1 nr_cpus=4 selinux=0 systemd.unit=kata-containers.target "
            "systemd.mask=systemd-networkd.service agent.log=debug agent.debug_console "
            "agent.debug_console_vport=1026 agent.log_vport=1025 cgroup_no_v1=all\n")
    cfg = cmd(text)
    assert cfg.warnings == ()
    assert (cfg.log_level, cfg.debug_console, cfg.debug_console_vport, cfg.log_vport,
            cfg.unified_cgroup_hierarchy) == ("debug", True, 1026, 1025, True)


# --- devmode implies debug ---------------------------------------------------------------------

@pytest.mark.parametrize("text,level", [
    ("agent.devmode", "debug"),
    ("agent.devmode agent.log=info", "debug"),
    ("agent.log=error agent.devmode", "debug"),
    ("agent.devmode agent.log=trace", "trace"),
    ("agent.devmode=0 agent.log=info", "info"),
    ("agent.devmode agent.devmode=false", "info"),
])
def test_devmode_implies_debug(text, level):
    cfg = cmd(text)
    assert cfg.log_level == level


def test_devmode_from_toml_implies_debug(tmp_path):
    path = write(tmp_path, "dev_mode = true\n")
    assert load(cmdline="", config_file=path, environ={}).log_level == "debug"


def test_devmode_wins_over_a_less_verbose_flag():
    cfg = load(cmdline="agent.devmode", environ={}, overrides={"log_level": "warning"})
    assert cfg.log_level == "debug"


# --- TOML --------------------------------------------------------------------------------------

FULL_TOML = """
log_level = "debug"
dev_mode = false
debug_console = true
debug_console_vport = 1026
log_vport = 1025
server_addr = 'vsock://8:2048'
tracing = true
hotplug_timeout = 10
unified_cgroup_hierarchy = true
container_pipe_size = 65536
passfd_listener_port = 1027
policy_file = "/etc/kata-opa/default-policy.rego"
cgroup_parent = "kata"
"""


def test_toml_all_keys(tmp_path):
    path = write(tmp_path, FULL_TOML)
    cfg = load(cmdline="", config_file=path, environ={})
    assert cfg == AgentConfig(
        log_level="debug", debug_console=True, debug_console_vport=1026, log_vport=1025,
        server_addr="vsock://8:2048", tracing=True, hotplug_timeout=10.0,
        unified_cgroup_hierarchy=True, container_pipe_size=65536, passfd_listener_port=1027,
        config_file=path, policy_file="/etc/kata-opa/default-policy.rego", cgroup_parent="kata",
    )


def test_toml_from_cmdline_config_file(tmp_path):
    path = write(tmp_path, "log_level = 'error'\n")
    cfg = load(cmdline=f"agent.config_file={path} agent.trace", environ={})
    assert cfg.log_level == "error"
    assert cfg.config_file == path
    assert cfg.tracing is True  # upstream stops at agent.config_file; kagent does not


def test_caller_config_file_replaces_the_cmdline_one(tmp_path):
    mine = write(tmp_path, "log_level = 'error'\n", "mine.toml")
    cfg = load(cmdline="agent.config_file=/nonexistent.toml", config_file=mine, environ={})
    assert cfg.config_file == mine and cfg.log_level == "error" and cfg.warnings == ()


@pytest.mark.parametrize("toml,expected", [
    ("hotplug_timeout = 10", 10.0),
    ("hotplug_timeout = 2.5", 2.5),
    ("hotplug_timeout = '1m30s'", 90.0),
    ("hotplug_timeout = '7'", 7.0),
    ("hotplug_timeout = {secs = 5, nanos = 500000000}", 5.5),
    ("hotplug_timeout = {secs = 4}", 4.0),
    ("hotplug_timeout = {nanos = 1}", 1e-9),
    ("[hotplug_timeout]\nsecs = 6\nnanos = 0", 6.0),
])
def test_toml_hotplug_timeout_forms(tmp_path, toml, expected):
    cfg = load(cmdline="", config_file=write(tmp_path, toml + "\n"), environ={})
    assert cfg.warnings == ()
    assert cfg.hotplug_timeout == pytest.approx(expected)


@pytest.mark.parametrize("toml,fragment", [
    ("hotplug_timeout = 0", "greater than zero"),
    ("hotplug_timeout = -1", "greater than zero"),
    ("hotplug_timeout = 'abc'", "invalid duration"),
    ("hotplug_timeout = true", "expected a duration"),
    ("hotplug_timeout = nan", "out of range"),
    ("hotplug_timeout = inf", "out of range"),
    ("hotplug_timeout = [1]", "expected a duration"),
    ("hotplug_timeout = {secs = 0, nanos = 0}", "greater than zero"),
    ("hotplug_timeout = {secs = -1}", "non-negative integer"),
    ("hotplug_timeout = {secs = 1, nanos = 1000000000}", "below 1000000000"),
    ("hotplug_timeout = {secs = 1, millis = 1}", "unexpected key"),
    ("hotplug_timeout = {secs = 1.5}", "non-negative integer"),
    ("hotplug_timeout = 1e400", "out of range"),
])
def test_toml_hotplug_timeout_invalid(tmp_path, toml, fragment):
    path = write(tmp_path, toml + "\n")
    cfg = load(cmdline="agent.hotplug_timeout=9s", config_file=path, environ={})
    assert cfg.hotplug_timeout == 9.0  # the value from the lower source stays
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith(f"config file {path}: hotplug_timeout = ")
    assert fragment in cfg.warnings[0] and cfg.warnings[0].endswith("using 9s")


@pytest.mark.parametrize("toml,field", [
    ("log_level = 'loud'", "log_level"),
    ("log_level = 3", "log_level"),
    ("dev_mode = 'sometimes'", "dev_mode"),
    ("dev_mode = 2", "dev_mode"),
    ("debug_console = [true]", "debug_console"),
    ("debug_console_vport = -1", "debug_console_vport"),
    ("debug_console_vport = 1.5", "debug_console_vport"),
    ("debug_console_vport = true", "debug_console_vport"),
    ("log_vport = 4294967295", "log_vport"),
    ("server_addr = 'tcp://x'", "server_addr"),
    ("server_addr = 1024", "server_addr"),
    ("tracing = 'perhaps'", "tracing"),
    ("unified_cgroup_hierarchy = {}", "unified_cgroup_hierarchy"),
    ("container_pipe_size = -4096", "container_pipe_size"),
    ("passfd_listener_port = 'x'", "passfd_listener_port"),
    ("policy_file = ''", "policy_file"),
    ("policy_file = 7", "policy_file"),
    ("cgroup_parent = 'a/../b'", "cgroup_parent"),
])
def test_toml_bad_values(tmp_path, toml, field):
    path = write(tmp_path, toml + "\n")
    cfg = load(cmdline="", config_file=path, environ={})
    assert getattr(cfg, field) == getattr(DEFAULT, field)
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith(f"config file {path}: {field} = ")


@pytest.mark.parametrize("toml,value", [
    ("dev_mode = 1", True), ("dev_mode = 0", False), ("dev_mode = 'on'", True),
    ("debug_console_vport = '1026'", 1026),
])
def test_toml_lenient_forms(tmp_path, toml, value):
    cfg = load(cmdline="", config_file=write(tmp_path, toml + "\n"), environ={})
    field = toml.split()[0]
    assert getattr(cfg, field) == value and cfg.warnings == ()


def test_toml_unknown_keys(tmp_path):
    path = write(tmp_path, "trace = true\ncdh_api_timeout = 5\n[endpoints]\nallowed = []\n")
    cfg = load(cmdline="", config_file=path, environ={})
    assert cfg.tracing is False
    assert cfg.warnings == (
        f"config file {path}: unknown key trace",
        f"config file {path}: unsupported upstream key cdh_api_timeout, ignored",
        f"config file {path}: unknown key endpoints",
    )


def test_toml_missing_file_other_sources_apply(tmp_path):
    missing = str(tmp_path / "nope.toml")
    cfg = load(cmdline="agent.log=debug", config_file=missing,
               environ={"KATA_AGENT_TRACING": "1"})
    assert (cfg.log_level, cfg.tracing, cfg.config_file) == ("debug", True, missing)
    assert cfg.warnings == (f"config file {missing}: cannot read: No such file or directory",)


@pytest.mark.parametrize("content,fragment", [
    ("log_level = \n", "invalid TOML"),
    ("log_level = 'debug'\nlog_level = 'info'\n", "invalid TOML"),
    ("[unclosed\n", "invalid TOML"),
    (b"log_level = '\xff'\n", "cannot read"),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "invalid TOML"),
])
def test_toml_unparsable(tmp_path, content, fragment):
    path = write(tmp_path, content)
    cfg = load(cmdline="agent.log=error", config_file=path, environ={})
    assert cfg.log_level == "error"
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith(f"config file {path}: {fragment}")


def test_toml_directory_and_fifo(tmp_path):
    cfg = load(cmdline="", config_file=str(tmp_path), environ={})
    assert "cannot read" in cfg.warnings[0]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cfg = load(cmdline="", config_file=str(fifo), environ={})  # must not block
    assert "not a regular file" in cfg.warnings[0]


# --- environment, overrides and precedence ---------------------------------------------------

@pytest.mark.parametrize("env,field,expected", [
    ({"KATA_AGENT_SERVER_ADDR": "unix:///run/k.sock"}, "server_addr", "unix:///run/k.sock"),
    ({"KATA_AGENT_LOG_LEVEL": "warn"}, "log_level", "warning"),
    ({"KATA_AGENT_TRACING": "true"}, "tracing", True),
    ({"KATA_AGENT_TRACING": "0"}, "tracing", False),
    ({"KATA_AGENT_POLICY_FILE": "/p.rego"}, "policy_file", "/p.rego"),
    ({"KATA_AGENT_LOG_LEVEL": ""}, "log_level", "info"),  # empty = unset
])
def test_env(env, field, expected):
    cfg = load(cmdline="", environ=env)
    assert getattr(cfg, field) == expected and cfg.warnings == ()


@pytest.mark.parametrize("env,field", [
    ({"KATA_AGENT_SERVER_ADDR": "hvsock://x"}, "server_addr"),
    ({"KATA_AGENT_LOG_LEVEL": "loud"}, "log_level"),
    ({"KATA_AGENT_TRACING": "perhaps"}, "tracing"),
])
def test_env_invalid(env, field):
    cfg = load(cmdline="", environ=env)
    assert getattr(cfg, field) == getattr(DEFAULT, field)
    (name, value), = env.items()
    assert len(cfg.warnings) == 1 and cfg.warnings[0].startswith(f"{name}={value}: ")


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("KATA_AGENT_LOG_LEVEL", "trace")
    assert load(cmdline="").log_level == "trace"


def test_precedence(tmp_path):
    """defaults < cmdline < TOML < env < overrides, field by field."""
    path = write(tmp_path, "log_level = 'error'\nserver_addr = 'vsock://3:1'\n"
                           "tracing = false\nlog_vport = 7\n")
    cmdline = (f"agent.config_file={path} agent.log=debug agent.server_addr=vsock://2:1 "
               "agent.trace agent.log_vport=5 agent.debug_console_vport=6")
    env = {"KATA_AGENT_SERVER_ADDR": "vsock://4:1", "KATA_AGENT_LOG_LEVEL": "critical"}

    cfg = load(cmdline=cmdline, environ={})
    assert (cfg.log_level, cfg.server_addr, cfg.tracing) == ("error", "vsock://3:1", False)
    assert (cfg.log_vport, cfg.debug_console_vport) == (7, 6)

    cfg = load(cmdline=cmdline, environ=env)
    assert (cfg.log_level, cfg.server_addr) == ("critical", "vsock://4:1")

    cfg = load(cmdline=cmdline, environ=env,
               overrides={"server_addr": "unix:///flag.sock", "log_level": "trace"})
    assert (cfg.log_level, cfg.server_addr) == ("trace", "unix:///flag.sock")
    assert cfg.warnings == ()


def test_overrides_none_skipped_invalid_warned():
    cfg = load(cmdline="agent.log=debug", environ={},
               overrides={"server_addr": None, "log_level": "loud", "bogus": 1,
                          "config_file": "/x"})
    assert cfg.log_level == "debug" and cfg.server_addr == DEFAULT.server_addr
    assert cfg.warnings == (
        "--log-level=loud: invalid log level (use trace, debug, info, warn, error, fatal), "
        "using debug",
        "unknown override bogus",
        "unknown override config_file",
    )


def test_cmdline_file_and_unreadable_proc(tmp_path, monkeypatch):
    path = write(tmp_path, "quiet agent.log=debug\n", "cmdline")
    assert load(cmdline_file=path, environ={}).log_level == "debug"
    cfg = load(cmdline_file=str(tmp_path / "missing"), environ={})
    assert dataclasses.replace(cfg, warnings=()) == DEFAULT
    assert cfg.warnings[0].startswith("cannot read the kernel command line")
    bad = write(tmp_path, b"agent.log=debug agent.foo=\xff\n", "binary")
    cfg = load(cmdline_file=bad, environ={})
    assert cfg.log_level == "debug"
    monkeypatch.setattr(config, "PROC_CMDLINE", str(tmp_path / "missing"))
    assert load(environ={}).warnings[0].startswith("cannot read the kernel command line")


def test_reads_proc_cmdline_by_default():
    load(environ={})  # whatever this machine's command line says, it must not raise


# --- the result --------------------------------------------------------------------------------

def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.log_level = "debug"  # type: ignore[misc]


def test_to_json_dict():
    cfg = cmd("agent.hotplug_timeout=1m agent.foo")
    d = cfg.to_json_dict()
    assert set(d) == {f.name for f in dataclasses.fields(AgentConfig)} == {
        "log_level", "dev_mode", "debug_console", "debug_console_vport", "log_vport",
        "debug_console_addr", "log_addr", "metrics_addr", "trace_addr", "trace_file",
        "server_addr", "tracing", "hotplug_timeout", "unified_cgroup_hierarchy",
        "container_pipe_size", "passfd_listener_port", "passfd_listener_addr", "config_file", "policy_file",
        "cgroup_parent", "ttrpc_max_connections", "ttrpc_max_inflight", "ttrpc_max_inflight_total",
        "ttrpc_max_inflight_bytes", "ttrpc_max_message_size", "ttrpc_frame_timeout", "warnings",
    }
    assert d["hotplug_timeout"] == 60.0 and isinstance(d["hotplug_timeout"], float)
    assert d["warnings"] == ["unknown option agent.foo"]
    assert json.loads(json.dumps(d)) == d


def test_ttrpc_limits_defaults_warnings_and_toml(tmp_path):
    from kagent.ttrpc.limits import Limits

    assert Limits.from_config(DEFAULT) == Limits()  # one set of defaults, in both places
    assert cmd("agent.ttrpc_frame_timeout=0").warnings == (
        "agent.ttrpc_frame_timeout=0: duration must be greater than zero, using 30s",)
    path = write(tmp_path, "ttrpc_max_connections = 3\nttrpc_frame_timeout = '1m'\n"
                           "ttrpc_max_message_size = 65536\n")
    cfg = load(cmdline="", config_file=path, environ={})
    assert cfg.warnings == ()
    limits = Limits.from_config(cfg)
    assert (limits.max_connections, limits.frame_timeout, limits.max_message) == (3, 60.0, 65536)
    assert cfg.to_json_dict()["ttrpc_frame_timeout"] == 60.0


def test_option_table_covers_every_field():
    fields = {f.name for f in dataclasses.fields(AgentConfig)} - {"warnings"}
    assert {opt.field for opt in config.OPTIONS} == fields


# --- never raises ------------------------------------------------------------------------------

agent_keys = st.sampled_from(sorted({k for o in config.OPTIONS for k in o.cmdline}
                                    | {"agent.foo", "agent.https_proxy", "agent."}))
tokens = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", agent_keys, st.text(max_size=30)),
    agent_keys,
)


def no_internal_errors(cfg: AgentConfig) -> None:
    assert isinstance(cfg, AgentConfig)
    assert not any("internal error" in w for w in cfg.warnings), cfg.warnings


@settings(max_examples=300, deadline=None)
@given(st.lists(tokens, max_size=8).map(" ".join))
def test_load_never_raises_on_any_cmdline(text):
    no_internal_errors(load(cmdline=text, environ={}))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_load_never_raises_on_any_text(text):
    no_internal_errors(load(cmdline=text, environ={}))


toml_keys = st.sampled_from([o.toml for o in config.OPTIONS if o.toml] + ["foo", "trace"])
toml_values = st.one_of(
    st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
    st.dictionaries(st.sampled_from(["secs", "nanos", "x"]), st.integers(), max_size=3),
    st.lists(st.integers(), max_size=3),
)


def toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {v}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(toml_keys, toml_values, max_size=6))
def test_load_never_raises_on_any_toml_values(tmp_path, doc):
    text = "".join(f"{k} = {toml_literal(v)}\n" for k, v in doc.items())
    no_internal_errors(load(cmdline="", config_file=write(tmp_path, text), environ={}))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_load_never_raises_on_any_toml_text(tmp_path, content):
    no_internal_errors(load(cmdline="", config_file=write(tmp_path, content), environ={}))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["KATA_AGENT_SERVER_ADDR", "KATA_AGENT_LOG_LEVEL",
                                        "KATA_AGENT_TRACING", "KATA_AGENT_POLICY_FILE"]),
                       st.text(max_size=30)),
       st.dictionaries(st.sampled_from(["server_addr", "log_level", "hotplug_timeout", "x"]),
                       st.one_of(st.none(), st.text(max_size=20), st.integers(),
                                 st.floats(), st.booleans())))
def test_load_never_raises_on_any_env_or_overrides(env, overrides):
    no_internal_errors(load(cmdline="", environ=env, overrides=overrides))
