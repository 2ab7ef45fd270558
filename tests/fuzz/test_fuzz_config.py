"""Fuzz target: the kernel command line and the TOML file, as the bytes a guest image or a
host could put there.  kagent.config.load never raises, never reports an internal
error, and every value it keeps is one its option's parser accepts.

(tests/test_config.py fuzzes command-line *text*; this target feeds *files*: invalid
UTF-8, NUL bytes, deep TOML nesting, huge numbers, files at and over the size limit.)
"""

from __future__ import annotations

import dataclasses

import reliability_harness as harness
from hypothesis import given
from hypothesis import strategies as st

from kagent import config

KEYS = sorted({k for o in config.OPTIONS for k in o.cmdline}) + ["agent.", "agent.https_proxy", "console"]
TOML_KEYS = sorted(o.toml for o in config.OPTIONS if o.toml) + ["mem_agent_x", "nope"]
VALUES = st.sampled_from(["", "0", "1", "-1", "true", "off", "10s", "1h-1m", "4294967296", "1" * 40,
                          "vsock://-1:1024", "unix:///x", "serial://p", "a/../b", "\x00", "\"quoted value\"",
                          "9" * 400, "1e400", "nan", "0x10", "ünï"]) | st.text(max_size=16)

cmdline_bytes = st.one_of(
    st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES),
                       st.sampled_from(KEYS), st.text(max_size=12)), max_size=12)
    .map(" ".join).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=300),
)


def toml_value(depth: int = 0) -> st.SearchStrategy[str]:
    scalar = st.one_of(
        st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True).map(
            lambda f: {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(f), repr(f))),
        st.booleans().map(lambda b: "true" if b else "false"), VALUES.map(lambda v: repr(v)),
        st.sampled_from(["1979-05-27T07:32:00Z", "07:32:00", "{secs = 1, nanos = 5}", "{secs = -1}",
                         "[1, 2]", "'''multi\nline'''", '"\\u0000"', "0o777", "0b101", "inf"]),
    )
    if depth >= 2:
        return scalar
    return st.one_of(scalar, st.lists(toml_value(depth + 1), max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"))


toml_bytes = st.one_of(
    st.lists(st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(TOML_KEYS), toml_value()), max_size=10)
    .map("\n".join).map(str.encode),
    st.binary(max_size=200),
    st.integers(1, 3000).map(lambda n: ("a = " + "[" * n + "]" * n).encode()),  # deep nesting
    st.sampled_from([b"\xff\xfe", b"log_level = 'debug'\x00", b"[table]\nlog_level = 1", b"x" * (1 << 20),
                     b"log_level = 'info'\n" + b"#" * (1 << 20)]),
)


def check(cfg: config.AgentConfig) -> None:
    assert isinstance(cfg, config.AgentConfig)
    assert not any("internal error" in w for w in cfg.warnings), cfg.warnings
    for opt in config.OPTIONS:  # whatever was kept is a value its option accepts (or the default)
        value = getattr(cfg, opt.field)
        if value != opt.default and opt.field != "config_file" and not opt.quiet:
            try:
                assert opt.parse(value) == value or isinstance(value, float)
            except ValueError:
                # several options share a field (cgroup_no_v1 → unified_cgroup_hierarchy)
                assert any(o.field == opt.field and o is not opt for o in config.OPTIONS), (opt.field, value)
    dataclasses.asdict(cfg)


@harness.fuzz_settings(300)
@given(cmdline=cmdline_bytes, toml=toml_bytes, env=st.dictionaries(
    st.sampled_from(["KATA_AGENT_LOG_LEVEL", "KATA_AGENT_SERVER_ADDR", "KATA_AGENT_TRACING", "X"]),
    VALUES.filter(lambda v: "\x00" not in v), max_size=3))
def test_load_from_any_files(tmp_path_factory, cmdline, toml, env):
    harness.record("config.load_files")
    d = tmp_path_factory.mktemp("cfg")
    (d / "cmdline").write_bytes(cmdline)
    (d / "agent.toml").write_bytes(toml)
    check(config.load(cmdline_file=str(d / "cmdline"), config_file=str(d / "agent.toml"), environ=env))
    # and the config file named from the command line instead
    check(config.load(cmdline=f"agent.config_file={d / 'agent.toml'}", environ={}))


def test_special_files_do_not_block_or_crash(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo")  # a FIFO never blocks load()
    for path in (tmp_path / "fifo", tmp_path, "/dev/zero", "/proc/self/mem", tmp_path / "missing"):
        cfg = config.load(cmdline_file=str(path), config_file=str(path), environ={})
        check(cfg)
        assert cfg.warnings
    harness.record("config.load_files", 5)
