"""`recscore serve` as a real process on loopback: every acknowledged feedback event survives kill -9."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from engine_data import build_small

from recscore.serve.client import ApiError, Client
from recscore.state import SQLiteState

START_SECONDS = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recscore(*args):
    return [sys.executable, "-m", "recscore", *map(str, args)]


def start(bundle, port, log):
    with open(log, "w") as out:
        process = subprocess.Popen(recscore("serve", bundle, "--port", port), stdout=out, stderr=subprocess.STDOUT)
    client = Client(f"http://127.0.0.1:{port}", timeout=5)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"recscore serve exited with {process.returncode}")
        try:
            client.ready()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    pytest.fail("recscore serve did not become ready")


def test_acknowledged_feedback_survives_sigkill(tmp_path):
    bundle = build_small(tmp_path / "b")
    token = subprocess.run(recscore("keys", "create", bundle, "--role", "write"), capture_output=True, text=True,
                           check=True).stdout.strip()
    listed = subprocess.run(recscore("keys", "list", bundle), capture_output=True, text=True, check=True).stdout
    assert "write" in listed and token.split(".")[1] not in listed
    port = free_port()
    process = start(bundle, port, tmp_path / "first.log")
    client = Client(f"http://127.0.0.1:{port}", token, timeout=5)
    acknowledged, stop = [], threading.Event()

    def send():
        n = 0
        while not stop.is_set():
            event = {"user": 1000 + n % 7, "item": 1000 + n % 200, "value": 1.0, "ts": float(n)}
            try:
                client.feedback([event])
            except (OSError, ApiError):
                return
            acknowledged.append(event)
            n += 1
    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(1.0)
    os.kill(process.pid, signal.SIGKILL)          # while requests are in flight
    process.wait()
    stop.set()
    sender.join()
    assert len(acknowledged) > 10
    process = start(bundle, port, tmp_path / "second.log")
    try:
        state = SQLiteState(bundle / "state.sqlite3")
        stored = {(u, item, ts) for u in range(1000, 1007) for item, _, _, ts in state.events(u)}
        state.close()
        assert {(e["user"], e["item"], e["ts"]) for e in acknowledged} <= stored
        seen = {e["item"] for e in acknowledged if e["user"] == 1000}
        served = Client(f"http://127.0.0.1:{port}", token).recommend(1000, k=200)["items"]
        assert not seen & {i["item"] for i in served}          # the restarted server excludes them as seen
        first, second = (tmp_path / "first.log").read_text(), (tmp_path / "second.log").read_text()
        assert "created one, shown this once" in first and "shown this once" not in second
        assert "POST /v1/feedback" in first and token.split(".")[1] not in first + second
    finally:
        process.kill()
        process.wait()
