"""Stats parsers on golden files: v1 captured from this machine, v2 in the kernel's formats."""

from __future__ import annotations

import os

from cgroup_support import FIXTURES

from kagent.cgroups import stats
from kagent.protocols import agent_pb2


def _files(*dirs: str) -> dict[str, bytes]:
    out = {}
    for d in dirs:
        base = os.path.join(FIXTURES, d)
        for name in os.listdir(base):
            path = os.path.join(base, name)
            if os.path.isfile(path) and name != "README":
                with open(path, "rb") as f:
                    out[name] = f.read()
    return out


def test_flat_and_scalars():
    assert stats.parse_flat(b"a 1\nb 2\nbad\nc x\n d  4 \n") == {"a": 1, "b": 2, "d": 4}
    assert stats.parse_int(b"42\n") == 42 and stats.parse_int(None) == 0 and stats.parse_int(b"max") == 0
    assert stats.parse_max(b"max\n") == 0 and stats.parse_max(b"64\n") == 64 and stats.parse_max(None) == 0
    assert stats.parse_ints(b"5415430 314854541 \n") == [5415430, 314854541]
    assert stats.parse_u64(b"-1") == 0 and stats.parse_u64(b"9223372036854771712") == 9223372036854771712


def test_cpuacct_stat_ticks_to_ns():
    assert stats.parse_cpuacct_stat(b"user 29\nsystem 2\n", ticks=100) == (290_000_000, 20_000_000)
    assert stats.parse_cpuacct_stat(None) == (0, 0)


def test_blkio_recursive_golden():
    f = _files("v1")
    entries = stats.parse_blkio(f["blkio.throttle.io_service_bytes_recursive"])
    assert entries == [
        {"major": 254, "minor": 0, "op": "read", "value": 4096},
        {"major": 254, "minor": 0, "op": "write", "value": 1048576},
        {"major": 254, "minor": 0, "op": "sync", "value": 1052672},
        {"major": 254, "minor": 0, "op": "async", "value": 0},
        {"major": 254, "minor": 0, "op": "discard", "value": 0},
        {"major": 254, "minor": 0, "op": "total", "value": 1052672},
    ]  # the bare "Total" line is dropped
    assert stats.parse_blkio(b"8:0 6792\n8:16 12\n") == [
        {"major": 8, "minor": 0, "op": "", "value": 6792}, {"major": 8, "minor": 16, "op": "", "value": 12}]


def test_io_stat_golden():
    entries = stats.parse_io_stat(_files("v2")["io.stat"])
    assert entries[:6] == [
        {"major": 254, "minor": 0, "op": "read", "value": 4096},
        {"major": 254, "minor": 0, "op": "write", "value": 1048576},
        {"major": 254, "minor": 0, "op": "rios", "value": 1},
        {"major": 254, "minor": 0, "op": "wios", "value": 16},
        {"major": 254, "minor": 0, "op": "dbytes", "value": 0},
        {"major": 254, "minor": 0, "op": "dios", "value": 0},
    ]
    assert len(entries) == 12 and entries[6]["major"] == 8 and entries[6]["value"] == 1310720


def test_v1_stats_golden():
    f = _files("v1", "v1/synthetic")
    s = stats.v1_stats(f, ["1GB", "2MB"], ticks=100)
    cpu = s["cpu_stats"]
    assert cpu["cpu_usage"] == {"total_usage": 320269971, "percpu_usage": [5415430, 314854541],
                                "usage_in_kernelmode": 20_000_000, "usage_in_usermode": 290_000_000}
    assert cpu["throttling_data"] == {"periods": 0, "throttled_periods": 0, "throttled_time": 0}
    mem = s["memory_stats"]
    assert mem["cache"] == 73728 and mem["use_hierarchy"] is True
    assert mem["stats"]["rss"] == 33660928 and mem["stats"]["total_pgfault"] == 8520 and len(mem["stats"]) > 40
    assert mem["usage"]["limit"] == 268435456
    assert mem["usage"]["usage"] == int(f["memory.usage_in_bytes"]) and mem["usage"]["max_usage"] == int(f["memory.max_usage_in_bytes"])
    assert mem["swap_usage"]["limit"] == 9223372036854771712
    assert mem["kernel_usage"]["usage"] == int(f["memory.kmem.usage_in_bytes"])
    assert s["pids_stats"] == {"current": 1, "limit": 64}
    blk = s["blkio_stats"]
    assert set(blk) == {"io_service_bytes_recursive", "io_serviced_recursive"}  # throttle fallback (mq-deadline)
    assert {"major": 254, "minor": 0, "op": "write", "value": 16} in blk["io_serviced_recursive"]
    assert s["hugetlb_stats"] == {"1GB": {"usage": 0, "max_usage": 0, "failcnt": 0},
                                  "2MB": {"usage": 2097152, "max_usage": 4194304, "failcnt": 7}}


def test_v1_stats_prefers_cfq_files_when_present():
    files = {"blkio.io_serviced_recursive": b"8:0 Read 3\n8:0 Write 4\nTotal 7\n",
             "blkio.sectors_recursive": b"8:0 100\n", "blkio.time_recursive": b"8:0 9\n",
             "blkio.throttle.io_serviced_recursive": b"8:0 Read 99\n"}
    blk = stats.v1_stats(files)["blkio_stats"]
    assert blk["io_serviced_recursive"] == [{"major": 8, "minor": 0, "op": "read", "value": 3},
                                            {"major": 8, "minor": 0, "op": "write", "value": 4}]
    assert blk["sectors_recursive"] == [{"major": 8, "minor": 0, "op": "", "value": 100}]
    assert blk["io_time_recursive"][0]["value"] == 9


def test_v1_stats_with_nothing_mounted():
    s = stats.v1_stats({})
    assert s["cpu_stats"]["cpu_usage"]["total_usage"] == 0 and s["pids_stats"] == {"current": 0, "limit": 0}
    assert stats.to_proto(s) == agent_pb2.CgroupStats(**{k: v for k, v in s.items() if k != "hugetlb_stats"})


def test_v2_stats_golden():
    f = _files("v2")
    s = stats.v2_stats(f, ["2MB"])
    assert s["cpu_stats"]["cpu_usage"] == {"total_usage": 1534021000, "percpu_usage": [],
                                           "usage_in_kernelmode": 334004000, "usage_in_usermode": 1200017000}
    assert s["cpu_stats"]["throttling_data"] == {"periods": 120, "throttled_periods": 37, "throttled_time": 820331000}
    mem = s["memory_stats"]
    assert mem["cache"] == 73728 and mem["stats"]["anon"] == 33660928
    assert mem["usage"] == {"usage": 34881536, "max_usage": 35901440, "failcnt": 12, "limit": 268435456}
    assert mem["swap_usage"] == {"usage": 0, "max_usage": 4096, "failcnt": 3, "limit": 0}
    assert mem["kernel_usage"]["usage"] == 1146880
    assert s["pids_stats"] == {"current": 3, "limit": 0}
    assert s["hugetlb_stats"] == {"2MB": {"usage": 2097152, "max_usage": 0, "failcnt": 5}}
    assert len(s["blkio_stats"]["io_service_bytes_recursive"]) == 12


def test_v2_real_cpu_stat_without_the_cpu_controller():
    s = stats.v2_stats({"cpu.stat": _files("v2")["real.cpu.stat"]})
    assert s["cpu_stats"]["cpu_usage"]["total_usage"] == 320269000
    assert s["cpu_stats"]["throttling_data"] == {"periods": 0, "throttled_periods": 0, "throttled_time": 0}


def test_to_proto_round_trip():
    s = stats.v1_stats(_files("v1", "v1/synthetic"), ["2MB"], ticks=100)
    msg = stats.to_proto(s)
    assert isinstance(msg, agent_pb2.CgroupStats)
    assert list(msg.cpu_stats.cpu_usage.percpu_usage) == [5415430, 314854541]
    assert msg.memory_stats.stats["rss"] == 33660928
    assert msg.hugetlb_stats["2MB"].failcnt == 7
    assert msg.blkio_stats.io_service_bytes_recursive[1].op == "write"
    assert agent_pb2.CgroupStats.FromString(msg.SerializeToString()) == msg
