"""The benchmark: the gateway's own cost, side by side with the direct path (and, when asked,
lm-proxy and LiteLLM), on one machine, in one go.

    apt-get install -y wrk gcc          # the load generator and the mock's compiler
    python bench/run.py                 # lm-gateway vs the direct path
    python bench/run.py --with lm-proxy --with litellm   # + the others, in throwaway venvs

Layout (2 cores): the server under test is pinned to core 0 (``taskset -c 0``); the mock
upstream and the load generator share core 1. The mock is a small C program
(``bench/mock_upstream.c``, built on first use) that serves well over 10x what any gateway
does, so it never is the bottleneck (``--check-mock`` prints its own figures).

Measured, per server:

* non-streaming throughput at concurrency 1, 16, 64 and 256 (closed loop, ``wrk``);
* latency at concurrency 1: p50 and p99, and what the server adds over the direct path;
* CPU time per request (the server process's user+system time over the requests served);
* streaming at concurrency 1 (50 chunks, 2 ms apart): time to first token and to the end of
  the stream, and what the server adds; relay capacity (whole streams per second, c=64);
* RSS after start and at its peak.

Results go to stdout as one table and to ``bench/results/<date>.json``. No test asserts any
of this: figures live in ``doc/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVER_CORE = "0"
LOAD_CORE = "1"
BODY = '{"model":"mock","messages":[{"role":"user","content":"hello there"}]}'
STREAM_BODY = '{"model":"mock","stream":true,"messages":[{"role":"user","content":"hello there"}]}'
KEY = "sk-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


# -- processes -------------------------------------------------------------------------------


def build_mock() -> Path:
    binary = HERE / "mock_upstream"
    source = HERE / "mock_upstream.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


@contextlib.contextmanager
def process(
    argv: list[str], *, core: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` pinned to ``core``; stop it (SIGINT, then SIGKILL) afterwards."""
    proc = subprocess.Popen(
        ["taskset", "-c", core, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (multi-process servers)."""
    out = [pid]
    with contextlib.suppress(FileNotFoundError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += tree_pids(int(child))
    return out


def cpu_seconds(pid: int) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in tree_pids(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def rss_mib(pid: int) -> float:
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
            if match:
                total += int(match.group(1))
    return total / 1024


class PeakRSS:
    """Samples a process tree's RSS every 0.2 s while in use."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- load -------------------------------------------------------------------------------------


def wrk(
    url: str, body: str, connections: int, seconds: float, headers: dict[str, str]
) -> dict[str, float]:
    """Closed-loop load with wrk on the load core; requests/s and latency percentiles (ms)."""
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {json.dumps(body)}",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n")
    try:
        out = subprocess.run(
            [
                "taskset",
                "-c",
                LOAD_CORE,
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        os.unlink(script.name)
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    total = re.search(r"(\d+) requests in", out)
    result["requests"] = float(total.group(1)) if total else 0.0
    for pct in ("50", "99"):
        match = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if match:
            value, unit = float(match.group(1)), match.group(2)
            result[f"p{pct}_ms"] = (
                value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
            )
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result


def stream_timings(port: int, path: str, headers: dict[str, str], count: int) -> dict[str, float]:
    """``count`` sequential streams over one keep-alive connection (raw sockets, so the
    client costs the same on every path): median time to the first content chunk and to the
    end of the stream, in ms."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{head}"
        f"Content-Length: {len(STREAM_BODY)}\r\n\r\n{STREAM_BODY}"
    ).encode()
    firsts, totals = [], []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(request)
            first = None
            while True:
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("the server closed the connection mid-stream")
                buffer += data
                if first is None and b'"content":"tok' in buffer:
                    first = time.perf_counter() - start
                if b"0\r\n\r\n" in buffer and b"[DONE]" in buffer:
                    break
            totals.append(time.perf_counter() - start)
            firsts.append(first or totals[-1])
            buffer = b""
    return {
        "ttft_ms": statistics.median(firsts) * 1000,
        "stream_ms": statistics.median(totals) * 1000,
    }


# -- servers under test -----------------------------------------------------------------------


def gateway_config(upstream: int, port: int, *, extra: str = "", keys: int = 0) -> str:
    more = "".join(f', "sk-other-{i:06d}"' for i in range(keys))
    return f"""
host = "127.0.0.1"
port = {port}
{extra}
[connections.mock]
api_base = "http://127.0.0.1:{upstream}/v1"
api_key = "sk-mock"
[routing]
"*" = "mock.*"
[groups.default]
api_keys = ["{KEY}"{more}]
"""


#: lm-gateway's own scenarios (``--scenarios``): top-level config added, or a number of keys.
SCENARIOS: dict[str, dict[str, Any]] = {
    "plain": {},
    "metrics off": {"extra": "metrics = false"},
    "10,000 keys": {"keys": 10_000},
    "rate limiter": {"extra": 'before = [{ class = "RateLimiter", max_requests = 1000000000 }]'},
    "JSONL logging": {"extra": "LOGGER"},
}


def scenario_runs(up: int, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """lm-gateway under each scenario at concurrency 64: requests/s and CPU per request."""
    rows = []
    headers = {"Authorization": f"Bearer {KEY}"}
    for name, settings in SCENARIOS.items():
        extra = settings.get("extra", "")
        if extra == "LOGGER":
            log_file = work / "requests.jsonl"
            extra = (
                '[[loggers]]\nclass = "BaseLogger"\n'
                f'log_writer = {{ class = "JsonLogWriter", file_name = "{log_file}" }}'
            )
        port = free_port()
        config = work / f"scenario-{port}.toml"
        text = gateway_config(up, port, keys=settings.get("keys", 0))
        if extra.startswith("[[loggers]]"):
            text += "\n" + extra + "\n"
        else:
            text = extra + "\n" + text
        config.write_text(text)
        argv = [sys.executable, "-m", "lm_gateway", "serve", "--config", str(config)]
        with process(argv, core=SERVER_CORE, env={"LM_GATEWAY_ENV": ""}) as proc:
            wait_listening(port)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            wrk(url, BODY, 16, 2, headers)
            before = cpu_seconds(proc.pid)
            run = wrk(url, BODY, 64, args.seconds, headers)
            cpu = (cpu_seconds(proc.pid) - before) / max(run["requests"], 1) * 1e6
        rows.append({"scenario": name, "rps": run["rps"], "cpu_us": cpu, "errors": run["errors"]})
        print(f"| {name} | {run['rps']:,.0f} | {cpu:,.0f} µs | {run['errors']:.0f} |", flush=True)
    return rows


@contextlib.contextmanager
def lm_gateway(upstream: int, work: Path, extra: str = "") -> Iterator[tuple[int, int]]:
    port = free_port()
    config = work / f"gateway-{port}.toml"
    config.write_text(gateway_config(upstream, port, extra=extra))
    argv = [sys.executable, "-m", "lm_gateway", "serve", "--config", str(config)]
    with process(argv, core=SERVER_CORE, env={"LM_GATEWAY_ENV": ""}) as proc:
        wait_listening(port)
        yield port, proc.pid


def venv(name: str, packages: list[str]) -> Path:
    """A throwaway virtual environment under bench/.venvs with ``packages`` installed."""
    path = HERE / ".venvs" / name
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return path


@contextlib.contextmanager
def lm_proxy(upstream: int, work: Path) -> Iterator[tuple[int, int]]:
    path = venv("lm-proxy", ["lm-proxy==3.3.2"])
    port = free_port()
    config = work / "lm-proxy.toml"
    config.write_text(
        gateway_config(upstream, port).replace(
            'api_key = "sk-mock"', 'api_key = "sk-mock"\napi_type = "open_ai"'
        )
    )
    with process(
        [str(path / "bin" / "lm-proxy"), "--config", str(config)], core=SERVER_CORE, cwd=work
    ) as proc:
        wait_listening(port)
        yield port, proc.pid


@contextlib.contextmanager
def litellm(upstream: int, work: Path) -> Iterator[tuple[int, int]]:
    path = venv("litellm", ["litellm[proxy]==1.106.12"])
    port = free_port()
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n  - model_name: mock\n    litellm_params:\n"
        f"      model: openai/mock\n      api_base: http://127.0.0.1:{upstream}/v1\n"
        "      api_key: sk-mock\n"
        f"general_settings:\n  master_key: {KEY}\n"
    )
    with process(
        [
            str(path / "bin" / "litellm"),
            "--config",
            str(config),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--num_workers",
            "1",
        ],
        core=SERVER_CORE,
        env={"LITELLM_LOG": "ERROR"},
    ) as proc:
        wait_listening(port, timeout=180)
        yield port, proc.pid


# -- the run ----------------------------------------------------------------------------------


def measure(
    name: str, port: int, pid: int | None, args: argparse.Namespace, direct: dict[str, Any] | None
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    result: dict[str, Any] = {"name": name}
    if pid is not None:
        result["rss_start_mib"] = round(rss_mib(pid), 1)
    wrk(url, BODY, 16, 2, headers)  # warm up
    with contextlib.ExitStack() as stack:
        peak = stack.enter_context(PeakRSS(pid)) if pid is not None else None
        for connections in args.concurrency:
            cpu_before = cpu_seconds(pid) if pid is not None else 0.0
            run = wrk(url, BODY, connections, args.seconds, headers)
            if pid is not None and run["requests"]:
                run["cpu_us_per_request"] = (cpu_seconds(pid) - cpu_before) / run["requests"] * 1e6
            result[f"c{connections}"] = run
    if peak is not None:
        result["rss_peak_mib"] = round(peak.peak, 1)
    if direct is not None:
        for pct in ("p50_ms", "p99_ms"):
            result[f"added_{pct}"] = result["c1"][pct] - direct["c1"][pct]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--with",
        dest="others",
        action="append",
        default=[],
        choices=["lm-proxy", "litellm"],
        help="also measure these",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="each load run's length")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--streams", type=int, default=100, help="streams timed at c=1")
    parser.add_argument("--check-mock", action="store_true", help="only measure the mock")
    parser.add_argument(
        "--scenarios", action="store_true", help="only lm-gateway's scenarios (keys, limiter...)"
    )
    args = parser.parse_args()
    for tool in ("wrk", "taskset", "gcc"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install -y wrk util-linux gcc)")
    mock = build_mock()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up, stream_up = free_port(), free_port()
        with (
            process([str(mock), "--port", str(up)], core=LOAD_CORE),
            process(
                [str(mock), "--port", str(stream_up), "--chunks", "50", "--chunk-delay-ms", "2"],
                core=LOAD_CORE,
            ),
        ):
            wait_listening(up)
            wait_listening(stream_up)
            if args.scenarios:
                print("| scenario (c=64) | req/s | CPU/req | non-2xx |\n|---|---|---|---|")
                rows = scenario_runs(up, work, args)
                out = HERE / "results" / f"scenarios-{dt.datetime.now(dt.UTC):%Y-%m-%dT%H%M}.json"
                out.parent.mkdir(exist_ok=True)
                out.write_text(json.dumps({"machine": machine(), "scenarios": rows}, indent=2))
                return 0
            direct = measure("direct", up, None, args, None)
            direct.update(stream_timings(stream_up, "/v1/chat/completions", {}, args.streams))
            results.append(direct)
            if args.check_mock:
                print(json.dumps(direct, indent=2))
                return 0
            servers = [("lm-gateway", lm_gateway)]
            servers += [(o, {"lm-proxy": lm_proxy, "litellm": litellm}[o]) for o in args.others]
            for name, start in servers:
                with start(up, work) as (port, pid):
                    row = measure(name, port, pid, args, direct)
                with start(stream_up, work) as (port, pid):
                    timings = stream_timings(
                        port,
                        "/v1/chat/completions",
                        {"Authorization": f"Bearer {KEY}"},
                        args.streams,
                    )
                    row.update(timings)
                    row["added_ttft_ms"] = timings["ttft_ms"] - direct["ttft_ms"]
                    row["added_stream_ms"] = timings["stream_ms"] - direct["stream_ms"]
                    relay = wrk(
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                        STREAM_BODY,
                        64,
                        args.seconds,
                        {"Authorization": f"Bearer {KEY}"},
                    )
                    row["streams_per_s_c64"] = relay["rps"]
                results.append(row)
    print_table(results, args.concurrency)
    out = HERE / "results" / f"{dt.datetime.now(dt.UTC):%Y-%m-%dT%H%M}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    print(f"\nwritten to {out.relative_to(ROOT)}")
    return 0


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        ),
    }


def print_table(results: list[dict[str, Any]], concurrency: list[int]) -> None:
    columns = [f"c={c} req/s" for c in concurrency] + [
        "p50 c=1",
        "added p50",
        "added p99",
        "CPU/req",
        "TTFT",
        "+TTFT",
        "stream",
        "+stream",
        "streams/s",
        "RSS start",
        "RSS peak",
    ]
    print("| server | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in results:
        cells = [f"{row[f'c{c}']['rps']:,.0f}" for c in concurrency]
        cells += [
            f"{row['c1'].get('p50_ms', 0):.2f} ms",
            f"{row.get('added_p50_ms', 0):.2f} ms" if "added_p50_ms" in row else "—",
            f"{row.get('added_p99_ms', 0):.2f} ms" if "added_p99_ms" in row else "—",
            f"{row['c1'].get('cpu_us_per_request', 0):.0f} µs" if "rss_start_mib" in row else "—",
            f"{row.get('ttft_ms', 0):.2f} ms",
            f"{row.get('added_ttft_ms', 0):.2f} ms" if "added_ttft_ms" in row else "—",
            f"{row.get('stream_ms', 0):.1f} ms",
            f"{row.get('added_stream_ms', 0):.2f} ms" if "added_stream_ms" in row else "—",
            f"{row.get('streams_per_s_c64', 0):,.0f}" if "streams_per_s_c64" in row else "—",
            f"{row.get('rss_start_mib', 0):.0f} MiB" if "rss_start_mib" in row else "—",
            f"{row.get('rss_peak_mib', 0):.0f} MiB" if "rss_peak_mib" in row else "—",
        ]
        print(f"| {row['name']} | " + " | ".join(cells) + " |")
    ours = next((r for r in results if r["name"] == "lm-gateway"), None)
    for other in results:
        if ours is None or other["name"] in ("direct", "lm-gateway"):
            continue
        parts = []
        if 64 in concurrency:
            parts.append(f"{ours['c64']['rps'] / other['c64']['rps']:.2f}x the throughput at c=64")
        cpu_ours = ours["c1"].get("cpu_us_per_request")
        cpu_other = other["c1"].get("cpu_us_per_request")
        if cpu_ours and cpu_other:
            parts.append(f"{cpu_ours / cpu_other:.2f}x the CPU per request")
        if ours.get("streams_per_s_c64") and other.get("streams_per_s_c64"):
            ratio = ours["streams_per_s_c64"] / other["streams_per_s_c64"]
            parts.append(f"{ratio:.2f}x the relay capacity")
        print(f"lm-gateway vs {other['name']}: " + ", ".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
