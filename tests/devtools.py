"""Headless Debian Chromium, driven over the DevTools protocol, for the report and App browser tests.

Talks the protocol over --remote-debugging-pipe (NUL-separated JSON on fds 3 and 4), so no websocket
library or extra port is needed. Chromium runs in its own process group, killed whole at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,900"]


def chromium_binary() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise AssertionError("Debian's chromium is missing (scripts/test.sh installs it: apt-get install chromium)")
    return exe


@dataclass
class Page:
    """One tab. `call` sends a command to it and returns its result; `wait_for` returns the first message
    (answer or event, seen before or arriving now) that `pred` accepts; `events` keeps every message."""

    call: Callable[..., dict]
    wait_for: Callable[[Callable[[dict], bool]], dict]
    events: list[dict] = field(default_factory=list)


@contextlib.contextmanager
def chromium_page(profile: Path | None = None, answer_s: float = 60.0) -> Iterator[Page]:
    """A blank tab of a fresh headless Chromium; every wait for an answer or event gives up after `answer_s`."""
    own_profile = profile is None
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-")) if own_profile else profile
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()
    # bash puts the pipe ends on fds 3 and 4, where --remote-debugging-pipe expects them
    cmd = ["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', chromium_binary(), *CHROMIUM_FLAGS,
           f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
    proc = subprocess.Popen(cmd, pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    buf, next_id, events = b"", 0, []

    def wait_for(pred: Callable[[dict], bool]) -> dict:
        nonlocal buf
        seen = next((m for m in events if pred(m)), None)
        if seen is not None:
            return seen
        answer_by = time.monotonic() + answer_s
        while time.monotonic() < answer_by:
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                events.append(json.loads(raw))
                if pred(events[-1]):
                    return events[-1]
            if select.select([from_chrome_r], [], [], 0.5)[0]:
                chunk = os.read(from_chrome_r, 1 << 22)
                assert chunk, "chromium closed the DevTools pipe"
                buf += chunk
        raise TimeoutError(f"chromium: nothing awaited arrived within {answer_s} s")

    def send(method: str, params: dict | None = None, session: str | None = None) -> dict:
        nonlocal next_id
        next_id += 1
        msg_id = next_id
        msg = {"id": msg_id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(to_chrome_w, json.dumps(msg).encode() + b"\0")
        reply = wait_for(lambda m: m.get("id") == msg_id)
        assert "error" not in reply, reply
        return reply["result"]

    try:
        target = send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        yield Page(call=lambda method, params=None: send(method, params, session), wait_for=wait_for, events=events)
    finally:
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if own_profile:
            shutil.rmtree(profile, ignore_errors=True)


def console_errors(events: list[dict]) -> list[str]:
    """Uncaught exceptions, console.error/assert calls and browser log entries of level error
    (an image that failed to load, say) among a page's DevTools messages."""
    errors = []
    for m in events:
        p = m.get("params", {})
        if m.get("method") == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
        elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif m.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"{p['entry']['text']} {p['entry'].get('url', '')}")
    return errors
