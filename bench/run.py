"""The benchmark: the gateway's own cost, side by side with the direct path (and, when asked,
lm-proxy and LiteLLM), on one machine, in one go.

    apt-get install -y wrk gcc          # the load generator and the mock's compiler
    python bench/run.py                 # lm-gateway vs the direct path
    python bench/run.py --with lm-proxy --with litellm   # + the others, in throwaway venvs
    python bench/run.py --scenarios     # lm-gateway: keys, limiter, logging, Anthropic upstream
    python bench/run.py --many-streams 1000     # 1,000 concurrent slow streams: stalls, memory
    python bench/run.py --soak-seconds 600      # RSS under steady load, growth per minute

Layout (2 cores): the server under test is pinned to core 0 (``taskset -c 0``); the mock
upstream and the load generator share core 1. The mock is a small C program
(``bench/mock_upstream.c``, built on first use) that serves well over 10x what any gateway
does, so it never is the bottleneck (``--check-mock`` prints its own figures).

Measured, per server:

* non-streaming throughput at concurrency 1, 16, 64 and 256 (closed loop, ``wrk``);
* latency at concurrency 1: p50 and p99, and what the server adds over the direct path;
* CPU time per request (the server process's user+system time over the requests served);
* streaming at concurrency 1 (50 chunks, 2 ms apart): time to first token and to the end of
  the stream, and what the server adds; relay capacity (whole streams per second at c=64 and
  c=256: at c=64 the 100 ms streams cap any server at 640/s) and CPU time per relayed stream;
* RSS after start and at its peak.

``--scenarios`` runs lm-gateway alone at c=64 under configurations (many keys, a rate limiter,
JSONL logging, an Anthropic upstream the gateway translates to and from), with stream timings for
some. ``--many-streams N`` opens N paced streams at once through one worker (client:
``bench/streams.py``) and reports each chunk's lateness against its schedule next to the direct
path's, errors, RSS and peak CPU. ``--soak-seconds N`` holds c=64 for N s and samples RSS every
10 s. These three can be combined; the side-by-side table is then skipped.

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
import resource
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
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVER_CORE = "0"
LOAD_CORE = "1"
BODY = '{"model":"mock","messages":[{"role":"user","content":"hello there"}]}'
STREAM_BODY = '{"model":"mock","stream":true,"messages":[{"role":"user","content":"hello there"}]}'
ANTHROPIC_STREAM_BODY = (
    '{"model":"mock","max_tokens":64,"stream":true,'
    '"messages":[{"role":"user","content":"hello there"}]}'
)
KEY = "sk-bench"
AUTH = {"Authorization": f"Bearer {KEY}"}


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
                # wrk's default (2 s) drops slow servers' whole streams under load as timeouts
                "--timeout",
                "30s",
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
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    result["socket_errors"] = float(sum(int(n) for n in sockets.groups())) if sockets else 0.0
    return result


def stream_timings(
    port: int,
    path: str,
    headers: dict[str, str],
    count: int,
    *,
    body: str = STREAM_BODY,
    first_marker: bytes = b'"content":"tok',
    done_marker: bytes = b"[DONE]",
) -> dict[str, float]:
    """``count`` sequential streams over one keep-alive connection (raw sockets, so the
    client costs the same on every path): median time to the first content chunk and to the
    end of the stream, in ms. The markers find a content chunk and the stream's last event
    (Anthropic's format: ``b'"text_delta","text":"tok'`` and ``b"message_stop"``)."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{head}"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
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
                if first is None and first_marker in buffer:
                    first = time.perf_counter() - start
                if buffer.endswith(b"0\r\n\r\n") and done_marker in buffer:
                    break
            totals.append(time.perf_counter() - start)
            firsts.append(first or totals[-1])
            buffer = b""
    return {
        "ttft_ms": statistics.median(firsts) * 1000,
        "stream_ms": statistics.median(totals) * 1000,
    }


# -- servers under test -----------------------------------------------------------------------


def gateway_config(
    upstream: int,
    port: int,
    *,
    extra: str = "",
    keys: int = 0,
    api_type: str = "openai",
    connection: str = "",
) -> str:
    """lm-gateway's config: one connection ``mock`` to the mock upstream on ``upstream``, in
    the mock's OpenAI wire format or (``api_type="anthropic"``) its Anthropic Messages one;
    ``connection`` adds lines to that connection's table."""
    more = "".join(f', "sk-other-{i:06d}"' for i in range(keys))
    if api_type == "anthropic":
        upstream_lines = f'api_type = "anthropic"\napi_base = "http://127.0.0.1:{upstream}"'
    else:
        upstream_lines = f'api_base = "http://127.0.0.1:{upstream}/v1"'
    return f"""
host = "127.0.0.1"
port = {port}
{extra}
[connections.mock]
{upstream_lines}
api_key = "sk-mock"
{connection}
[routing]
"*" = "mock.*"
[groups.default]
api_keys = ["{KEY}"{more}]
"""


#: lm-gateway's own scenarios (``--scenarios``): top-level config added, a number of keys, the
#: upstream's wire format; ``stream`` also times streams (TTFT, end, relay capacity).
SCENARIOS: dict[str, dict[str, Any]] = {
    "plain": {"stream": True},
    "metrics off": {"extra": "metrics = false"},
    "10,000 keys": {"keys": 10_000},
    "rate limiter": {"extra": 'before = [{ class = "RateLimiter", max_requests = 1000000000 }]'},
    "JSONL logging": {"extra": "LOGGER"},
    "Anthropic upstream (translated)": {"api_type": "anthropic", "stream": True},
}


def scenario_config(upstream: int, port: int, work: Path, settings: dict[str, Any]) -> str:
    extra = settings.get("extra", "")
    text = gateway_config(
        upstream, port, keys=settings.get("keys", 0), api_type=settings.get("api_type", "openai")
    )
    if extra == "LOGGER":
        log_file = work / "requests.jsonl"
        return (
            text + '\n[[loggers]]\nclass = "BaseLogger"\n'
            f'log_writer = {{ class = "JsonLogWriter", file_name = "{log_file}" }}\n'
        )
    return extra + "\n" + text


def direct_stream_references(stream_up: int, count: int) -> dict[str, dict[str, float]]:
    """The mock's own stream timings in both wire formats: what the scenarios' streams add to."""
    return {
        "openai": stream_timings(stream_up, "/v1/chat/completions", {}, count),
        "anthropic": stream_timings(
            stream_up,
            "/v1/messages",
            {},
            count,
            body=ANTHROPIC_STREAM_BODY,
            first_marker=b'"text_delta","text":"tok',
            done_marker=b"message_stop",
        ),
    }


def scenario_runs(
    up: int, stream_up: int, work: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """lm-gateway under each scenario at concurrency 64: requests/s and CPU per request; for the
    scenarios marked ``stream``, also stream timings at c=1 and relay capacity at c=64 (the
    client speaks OpenAI chat completions to the gateway in every scenario)."""
    rows = []
    direct = direct_stream_references(stream_up, args.streams)
    for wire, timings in direct.items():
        print(
            f"| direct mock, {wire} stream | — | — | — | {timings['ttft_ms']:.2f} ms | — "
            f"| {timings['stream_ms']:.1f} ms | — | — |",
            flush=True,
        )
    for name, settings in SCENARIOS.items():
        port = free_port()
        config = work / f"scenario-{port}.toml"
        config.write_text(scenario_config(up, port, work, settings))
        argv = [sys.executable, "-m", "lm_gateway", "serve", "--config", str(config)]
        with process(argv, core=SERVER_CORE, env={"LM_GATEWAY_ENV": ""}) as proc:
            wait_listening(port)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            wrk(url, BODY, 16, 2, AUTH)
            before = cpu_seconds(proc.pid)
            run = wrk(url, BODY, 64, args.seconds, AUTH)
            cpu = (cpu_seconds(proc.pid) - before) / max(run["requests"], 1) * 1e6
        row: dict[str, Any] = {
            "scenario": name,
            "rps": run["rps"],
            "cpu_us": cpu,
            "errors": run["errors"],
        }
        if settings.get("stream"):
            config.write_text(scenario_config(stream_up, port, work, settings))
            with process(argv, core=SERVER_CORE, env={"LM_GATEWAY_ENV": ""}):
                wait_listening(port)
                timings = stream_timings(port, "/v1/chat/completions", AUTH, args.streams)
                relay = wrk(url, STREAM_BODY, 64, args.seconds, AUTH)
            reference = direct[settings.get("api_type", "openai")]
            row.update(timings)
            row["added_ttft_ms"] = timings["ttft_ms"] - reference["ttft_ms"]
            row["added_stream_ms"] = timings["stream_ms"] - reference["stream_ms"]
            row["streams_per_s_c64"] = relay["rps"]
            row["stream_errors"] = relay["errors"]
        rows.append(row)
        streamed = (
            f"{row['ttft_ms']:.2f} ms | {row['added_ttft_ms']:.2f} ms | {row['stream_ms']:.1f} ms "
            f"| {row['added_stream_ms']:.2f} ms | {row['streams_per_s_c64']:,.0f}"
            if "ttft_ms" in row
            else "— | — | — | — | —"
        )
        print(
            f"| {name} | {run['rps']:,.0f} | {cpu:,.0f} µs | {run['errors']:.0f} | {streamed} |",
            flush=True,
        )
    return rows


@contextlib.contextmanager
def lm_gateway(
    upstream: int, work: Path, extra: str = "", server: str = "lm-gateway", **config: Any
) -> Iterator[tuple[int, int]]:
    """lm-gateway on its own HTTP server (the default), or on Hypercorn (``server``)."""
    port = free_port()
    path = work / f"gateway-{port}.toml"
    path.write_text(gateway_config(upstream, port, extra=extra, **config))
    argv = [sys.executable, "-m", "lm_gateway", "serve", "--config", str(path), "--server", server]
    with process(argv, core=SERVER_CORE, env={"LM_GATEWAY_ENV": ""}) as proc:
        wait_listening(port)
        yield port, proc.pid


# -- many slow streams, and the soak ----------------------------------------------------------


class Sampler:
    """Samples a process tree's RSS (MiB) and CPU time (s) every ``every`` seconds."""

    def __init__(self, pid: int, every: float) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, float, float]] = []  # (seconds since start, RSS, CPU)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _sample(self) -> None:
        self.samples.append((time.monotonic() - self._t0, rss_mib(self.pid), cpu_seconds(self.pid)))

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(self.every - (time.monotonic() - self._t0) % self.every):
            self._sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def peak_rss(self) -> float:
        return max((rss for _, rss, _ in self.samples), default=0.0)

    def peak_cpu_share(self) -> float:
        """The highest share of a core the process used between two samples."""
        shares = [
            (c2 - c1) / (t2 - t1)
            for (t1, _, c1), (t2, _, c2) in zip(self.samples, self.samples[1:], strict=False)
            if t2 > t1
        ]
        return max(shares, default=0.0)


def stream_client(port: int, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """``bench/streams.py`` on the load core: ``--many-streams`` paced streams at once."""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            LOAD_CORE,
            sys.executable,
            str(HERE / "streams.py"),
            "--port",
            str(port),
            "--streams",
            str(args.many_streams),
            "--chunks",
            str(args.many_chunks),
            "--delay-ms",
            str(args.many_delay_ms),
            "--ramp-s",
            str(args.many_ramp_s),
            *extra,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def many_streams(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``--many-streams N`` slow paced streams at once through one lm-gateway worker: each
    chunk's lateness against its schedule, next to the same client straight on the mock;
    streams completed, errors; the gateway's RSS at start, peak and after, and its peak CPU."""
    mock = build_mock()
    up = free_port()
    argv = [str(mock), "--port", str(up), "--chunks", str(args.many_chunks)]
    argv += ["--chunk-delay-ms", str(args.many_delay_ms)]
    result: dict[str, Any] = {}
    with process(argv, core=LOAD_CORE):
        wait_listening(up)
        result["direct"] = stream_client(up, args)
        pool = f"max_connections = {args.many_streams + 64}"
        with lm_gateway(up, work, connection=pool) as (port, pid):
            time.sleep(1)
            gateway: dict[str, Any] = {"rss_start_mib": rss_mib(pid)}
            with Sampler(pid, 0.5) as sampler:
                gateway.update(
                    stream_client(port, args, "--header", f"Authorization: Bearer {KEY}")
                )
            gateway["rss_peak_mib"] = sampler.peak_rss()
            gateway["cpu_peak_share"] = sampler.peak_cpu_share()
            gateway["cpu_s"] = sampler.samples[-1][2] - sampler.samples[0][2]
            gateway["samples_t_rss_cpu"] = [
                (round(t, 2), round(rss, 1), round(cpu, 2)) for t, rss, cpu in sampler.samples
            ]
            time.sleep(5)
            gateway["rss_after_mib"] = rss_mib(pid)
            result["lm-gateway"] = gateway
    return result


def print_many_streams(result: dict[str, Any]) -> None:
    print(
        "| path | completed | errors | late p50 | late p99 | late max | chunks > 50 ms late "
        "| first chunk late p99 / max | client CPU | RSS start / peak / after | gateway CPU peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in result.items():
        if not isinstance(row, dict) or "completed" not in row:
            continue
        rss = "—"
        if "rss_start_mib" in row:
            rss = " / ".join(
                f"{row[k]:.0f}" for k in ("rss_start_mib", "rss_peak_mib", "rss_after_mib")
            )
            rss += " MiB"
        cpu = f"{row['cpu_peak_share']:.0%}" if "cpu_peak_share" in row else "—"
        print(
            f"| {name} | {row['completed']}/{row['streams']} | {row['errors']} "
            f"| {row['late_p50_ms']:.2f} ms | {row['late_p99_ms']:.2f} ms "
            f"| {row['late_max_ms']:.2f} ms | {row['late_over_50ms']} "
            f"| {row['first_late_p99_ms']:.1f} / {row['first_late_max_ms']:.1f} ms "
            f"| {row['client_cpu_s'] / row['wall_s']:.0%} | {rss} | {cpu} |"
        )
    direct, ours = result.get("direct"), result.get("lm-gateway")
    if direct and ours:
        print(
            f"beyond the direct path: p99 +{ours['late_p99_ms'] - direct['late_p99_ms']:.2f} ms, "
            f"max +{ours['late_max_ms'] - direct['late_max_ms']:.2f} ms"
        )
        if ours["error_kinds"]:
            print(f"errors: {ours['error_kinds']}")


#: Built in init(): at load time wrk.host is not known yet, and the requests would lack a Host.
SOAK_LUA = """
local plain, stream
local n = 0
init = function(args)
  plain = wrk.format(nil, nil, nil, {body})
  stream = wrk.format(nil, nil, nil, {stream})
end
request = function()
  n = n + 1
  if {every} > 0 and n % {every} == 0 then return stream end
  return plain
end
"""


def soak(up: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """lm-gateway under steady load (wrk, c=64; every ``--soak-stream-every``-th request a
    paced stream) for ``--soak-seconds``, its RSS sampled every 10 s: RSS per minute and the
    growth per minute (least squares over the second half, past the warm-up)."""
    lines = [
        'wrk.method = "POST"',
        'wrk.headers["Content-Type"] = "application/json"',
        f'wrk.headers["Authorization"] = "Bearer {KEY}"',
        SOAK_LUA.format(
            body=json.dumps(BODY), stream=json.dumps(STREAM_BODY), every=args.soak_stream_every
        ),
    ]
    script = work / "soak.lua"
    script.write_text("\n".join(lines))
    with lm_gateway(up, work) as (port, pid):
        rss_start = rss_mib(pid)
        cpu_before = cpu_seconds(pid)
        load = subprocess.Popen(
            [
                "taskset",
                "-c",
                LOAD_CORE,
                "wrk",
                "-t1",
                "-c64",
                f"-d{args.soak_seconds}s",
                "--timeout",
                "30s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}/v1/chat/completions",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        with Sampler(pid, 10.0) as sampler:
            out, _ = load.communicate()
        cpu = cpu_seconds(pid) - cpu_before
        time.sleep(5)
        rss_after = rss_mib(pid)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    requests = float(total.group(1)) if total else 0.0
    samples = [(t, rss) for t, rss, _ in sampler.samples]
    per_minute = [
        round(min(samples, key=lambda s, m=m: abs(s[0] - 60 * m))[1], 1)
        for m in range(int(samples[-1][0] // 60) + 1)
    ]
    half = [(t / 60, rss) for t, rss in samples if t >= samples[-1][0] / 2]
    return {
        "seconds": args.soak_seconds,
        "stream_every": args.soak_stream_every,
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": requests,
        "errors": float(errors.group(1)) if errors else 0.0,
        "socket_errors": socket_errors.group(1).strip() if socket_errors else "",
        "cpu_us_per_request": cpu / max(requests, 1) * 1e6,
        "rss_start_mib": round(rss_start, 1),
        "rss_peak_mib": round(max(rss for _, rss in samples), 1),
        "rss_after_mib": round(rss_after, 1),
        "rss_per_minute_mib": per_minute,
        "rss_samples": [(round(t, 1), round(rss, 2)) for t, rss in samples],
        "growth_mib_per_minute": slope(half),
    }


def slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of ``points``."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def print_soak(result: dict[str, Any]) -> None:
    socket_errors = result["socket_errors"]
    print(
        f"soak: {result['seconds']} s at c=64 (every {result['stream_every']}th request a stream), "
        f"{result['rps']:,.0f} req/s, {result['requests']:,.0f} requests, "
        f"{result['errors']:.0f} non-2xx, socket errors: {socket_errors or 'none'}, "
        f"{result['cpu_us_per_request']:,.0f} µs CPU/request"
    )
    print(
        f"RSS: {result['rss_start_mib']:.1f} MiB before the load, "
        f"peak {result['rss_peak_mib']:.1f}, {result['rss_after_mib']:.1f} after it; per minute: "
        + ", ".join(f"{x:.1f}" for x in result["rss_per_minute_mib"])
        + f" MiB; growth over the second half: {result['growth_mib_per_minute']:+.3f} MiB/min"
    )


def venv(name: str, packages: list[str]) -> Path:
    """A throwaway virtual environment under bench/.venvs with ``packages`` installed."""
    path = HERE / ".venvs" / name
    python = path / "bin" / "python"
    done = path / "bench-installed.txt"  # written last: an interrupted install is redone
    if not done.exists() or done.read_text() != " ".join(packages):
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
        done.write_text(" ".join(packages))
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
        # No fetch of the model price map at start (this machine has no internet anyway).
        env={"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
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
        peak = stack.enter_context(Sampler(pid, 0.2)) if pid is not None else None
        for connections in args.concurrency:
            cpu_before = cpu_seconds(pid) if pid is not None else 0.0
            run = wrk(url, BODY, connections, args.seconds, headers)
            if pid is not None and run["requests"]:
                run["cpu_us_per_request"] = (cpu_seconds(pid) - cpu_before) / run["requests"] * 1e6
            result[f"c{connections}"] = run
    if peak is not None:
        result["rss_peak_mib"] = round(peak.peak_rss(), 1)
    if direct is not None:
        for pct in ("p50_ms", "p99_ms"):
            result[f"added_{pct}"] = result["c1"][pct] - direct["c1"][pct]
    return result


def relay_capacity(port: int, pid: int, seconds: float) -> dict[str, float]:
    """Whole paced streams relayed per second at c=64 and c=256, and the server's CPU time per
    stream at c=256. At c=64 a 100 ms stream caps any server at 640 streams/s, so c=256 (cap
    2,560/s) is what shows a fast server's capacity; both are kept for comparison with earlier
    runs."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}"}
    out: dict[str, float] = {}
    for connections in (64, 256):
        cpu_before = cpu_seconds(pid)
        run = wrk(url, STREAM_BODY, connections, seconds, headers)
        out[f"streams_per_s_c{connections}"] = run["rps"]
        out[f"stream_errors_c{connections}"] = run["errors"] + run["socket_errors"]
        if run["requests"]:
            out[f"cpu_us_per_stream_c{connections}"] = (
                (cpu_seconds(pid) - cpu_before) / run["requests"] * 1e6
            )
    out["relay_capacity"] = max(out["streams_per_s_c64"], out["streams_per_s_c256"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--with",
        dest="others",
        action="append",
        default=[],
        choices=["lm-proxy", "litellm", "lm-gateway-hypercorn"],
        help="also measure these (lm-gateway-hypercorn: lm-gateway served by Hypercorn)",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="each load run's length")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--streams", type=int, default=100, help="streams timed at c=1")
    parser.add_argument("--check-mock", action="store_true", help="only measure the mock")
    parser.add_argument(
        "--scenarios",
        action="store_true",
        help="only lm-gateway's scenarios (keys, limiter, logging, Anthropic upstream...)",
    )
    parser.add_argument(
        "--many-streams",
        type=int,
        default=0,
        metavar="N",
        help="only (with --scenarios/--soak-seconds) N concurrent slow streams through lm-gateway",
    )
    parser.add_argument("--many-chunks", type=int, default=20, help="chunks per slow stream")
    parser.add_argument("--many-delay-ms", type=int, default=1000, help="their spacing (ms)")
    parser.add_argument(
        "--many-ramp-s", type=float, default=10.0, help="spread the slow streams' starts over this"
    )
    parser.add_argument(
        "--soak-seconds",
        type=int,
        default=0,
        metavar="N",
        help="only (with --scenarios/--many-streams) a soak of N s at c=64, RSS every 10 s",
    )
    parser.add_argument(
        "--soak-stream-every",
        type=int,
        default=10,
        metavar="K",
        help="in the soak, every K-th request is a stream (0: none)",
    )
    args = parser.parse_args()
    for tool in ("wrk", "taskset", "gcc"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install -y wrk util-linux gcc)")
    # The runner's own threads (RSS and CPU samplers) stay off the server's core.
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    # Many streams need many file descriptors, here and in the servers (which inherit this).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mock = build_mock()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.many_streams or args.soak_seconds:
            return special_runs(mock, work, args)
        with open_mocks(mock) as (up, stream_up):
            if args.scenarios:
                rows = run_scenarios(up, stream_up, work, args)
                write_results("scenarios", {"scenarios": rows})
                return 0
            direct = measure("direct", up, None, args, None)
            direct.update(stream_timings(stream_up, "/v1/chat/completions", {}, args.streams))
            results.append(direct)
            if args.check_mock:
                print(json.dumps(direct, indent=2))
                return 0
            servers = [("lm-gateway", lm_gateway)]
            others = {
                "lm-proxy": lm_proxy,
                "litellm": litellm,
                "lm-gateway-hypercorn": partial(lm_gateway, server="hypercorn"),
            }
            servers += [(o, others[o]) for o in args.others]
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
                    row.update(relay_capacity(port, pid, args.seconds))
                results.append(row)
    print_table(results, args.concurrency)
    out = HERE / "results" / f"{dt.datetime.now(dt.UTC):%Y-%m-%dT%H%M}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    print(f"\nwritten to {out.relative_to(ROOT)}")
    return 0


SCENARIO_HEADER = (
    "| scenario (c=64) | req/s | CPU/req | non-2xx | TTFT | +TTFT | stream | +stream "
    "| streams/s (c=64) |\n|---|---|---|---|---|---|---|---|---|"
)


def run_scenarios(
    up: int, stream_up: int, work: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    print(SCENARIO_HEADER, flush=True)
    return scenario_runs(up, stream_up, work, args)


@contextlib.contextmanager
def open_mocks(mock: Path) -> Iterator[tuple[int, int]]:
    """The two mocks the side-by-side and the scenarios use: (answers at once, paced streams:
    50 chunks 2 ms apart), listening."""
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
        yield up, stream_up


def special_runs(mock: Path, work: Path, args: argparse.Namespace) -> int:
    """``--scenarios``, ``--many-streams`` and ``--soak-seconds``, whichever were asked for,
    one after another; each starts the mocks it needs."""
    results: dict[str, Any] = {}
    if args.scenarios:
        with open_mocks(mock) as (up, stream_up):
            results["scenarios"] = run_scenarios(up, stream_up, work, args)
        print()
    if args.many_streams:
        print(
            f"{args.many_streams} concurrent streams, {args.many_chunks} chunks "
            f"{args.many_delay_ms} ms apart, started over {args.many_ramp_s} s:",
            flush=True,
        )
        results["many_streams"] = many_streams(work, args)
        print_many_streams(results["many_streams"])
        print()
    if args.soak_seconds:
        up = free_port()
        argv = [str(mock), "--port", str(up), "--chunks", "20", "--chunk-delay-ms", "5"]
        with process(argv, core=LOAD_CORE):
            wait_listening(up)
            results["soak"] = soak(up, work, args)
        print_soak(results["soak"])
    write_results("special", results)
    return 0


def write_results(prefix: str, results: dict[str, Any]) -> None:
    out = HERE / "results" / f"{prefix}-{dt.datetime.now(dt.UTC):%Y-%m-%dT%H%M}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **results}, indent=2))
    print(f"\nwritten to {out.relative_to(ROOT)}")


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
        "streams/s c=64 / 256",
        "CPU/stream",
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
            (
                f"{row['streams_per_s_c64']:,.0f} / {row['streams_per_s_c256']:,.0f}"
                if "streams_per_s_c256" in row
                else "—"
            ),
            (
                f"{row['cpu_us_per_stream_c256']:,.0f} µs"
                if "cpu_us_per_stream_c256" in row
                else "—"
            ),
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
        if ours.get("relay_capacity") and other.get("relay_capacity"):
            ratio = ours["relay_capacity"] / other["relay_capacity"]
            parts.append(f"{ratio:.2f}x the relay capacity (best of c=64 and c=256)")
        if ours.get("cpu_us_per_stream_c256") and other.get("cpu_us_per_stream_c256"):
            ratio = ours["cpu_us_per_stream_c256"] / other["cpu_us_per_stream_c256"]
            parts.append(f"{ratio:.2f}x the CPU per relayed stream")
        print(f"lm-gateway vs {other['name']}: " + ", ".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
