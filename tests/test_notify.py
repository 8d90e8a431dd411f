"""Notifications: real local HTTP receivers and a real command, the durable outbox across kills."""

from __future__ import annotations

import http.server
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ConfigFile, free_port, run_cli, wait_for
from daemonproc import events, query

from poller.config import NotifySettings
from poller.notify import EVENT_ENV, backoff_delay, command_env, make_route, sign

WEBHOOK_SECRET = "poller-TEST-WEBHOOK-SECRET-hmac"
URL_TOKEN = "poller-TEST-URL-TOKEN-t0k"


class Receiver:
    """A real HTTP server on 127.0.0.1 that records POSTs; it can fail the first N with a 500."""

    def __init__(self, port: int = 0, fail_first: int = 0) -> None:
        self.received: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.fail_first = fail_first
        self.attempts = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.attempts += 1
                if outer.attempts <= outer.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                outer.received.append((dict(self.headers), {"raw": body.decode(), **json.loads(body)}))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def events(self) -> list[tuple[str, str]]:
        return [(data(body)["watch"], data(body)["event"]) for _, body in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def data(body: dict[str, Any]) -> dict[str, Any]:
    """The event fields of a delivered document: a CloudEvent's ``data`` (the default format)."""
    return body["data"] if "specversion" in body else body


def outbox(db: Path) -> list[tuple[Any, ...]]:
    return query(db, "SELECT sink, status, attempts, last_error FROM notifications ORDER BY id")


def sink(**kw: Any) -> NotifySettings:
    return NotifySettings(**{"type": "webhook", "url": "http://x/", **kw})


def test_route_filters_by_watch_glob_and_event():
    route = make_route([sink(name="all"), sink(name="apps", watches=["app-*"], events=["modified", "deleted"])])
    assert route("app-config", "modified") == ["all", "apps"]
    assert route("app-config", "first_seen") == ["all"]
    assert route("other", "deleted") == ["all"]
    assert make_route([sink(name="x", watches=["App*"])])("app", "modified") == []


def test_backoff_doubles_and_is_capped():
    assert [backoff_delay(5, n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert backoff_delay(5, 40) == 3600


def test_webhook_delivered_with_signature_and_env_free_of_secrets(
    config: ConfigFile, s3, bucket, receiver, start_daemon
):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write(
        [{"name": "app", "bucket": bucket, "key": "k"}],
        notify=[{"name": "hook", "type": "webhook", "url": receiver.url("/" + URL_TOKEN), "secret": WEBHOOK_SECRET}],
    )
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: receiver.events() == [("app", "first_seen")], what="first_seen delivered")
    s3.put_object(Bucket=bucket, Key="k", Body=b"v2")
    wait_for(lambda: receiver.events() == [("app", "first_seen"), ("app", "modified")], what="modified delivered")
    headers, body = receiver.received[1]
    assert headers["X-Poller-Signature"] == sign(WEBHOOK_SECRET, body["raw"].encode())
    assert headers["X-Poller-Event"] == "modified" and headers["X-Poller-Delivery"] == body["id"]
    assert headers["Content-Type"] == "application/cloudevents+json; charset=utf-8"
    assert body["type"] == "io.poller.object.modified" and body["time"].endswith("Z")
    first = data(receiver.received[0][1])
    assert data(body)["bucket"] == bucket and data(body)["key"] == "k" and data(body)["previous_etag"] == first["etag"]
    wait_for(lambda: outbox(config.db) == [("hook", "delivered", 1, None)] * 2, what="outbox rows delivered")
    assert daemon.stop() == 0
    leaked = daemon.log + "".join(p.read_bytes().decode("latin-1") for p in config.db.parent.glob("poller.db*"))
    assert WEBHOOK_SECRET not in leaked and URL_TOKEN not in leaked


def test_receiver_outage_then_delivery_with_backoff(config: ConfigFile, s3, bucket, start_daemon):
    flaky = Receiver(fail_first=3)
    try:
        s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
        config.write(
            [{"name": "app", "bucket": bucket, "key": "k"}],
            notify=[{"name": "flaky", "type": "webhook", "url": flaky.url(), "backoff": "0.2s"}],
        )
        daemon = start_daemon(config)
        daemon.notify.wait("READY=1")
        wait_for(lambda: flaky.events() == [("app", "first_seen")], timeout=30, what="delivery after 3 failures")
        assert flaky.attempts == 4
        wait_for(lambda: outbox(config.db) == [("flaky", "delivered", 4, None)], what="attempts recorded")
        assert "attempt 1 failed: webhook answered HTTP 500" in daemon.log
        assert daemon.stop() == 0
    finally:
        flaky.close()


def test_event_delivered_after_kill_between_commit_and_delivery(config: ConfigFile, s3, bucket, start_daemon):
    port = free_port()  # nothing listens yet: deliveries fail and stay pending
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write(
        [{"name": "app", "bucket": bucket, "key": "k"}],
        notify=[{"name": "hook", "type": "webhook", "url": f"http://127.0.0.1:{port}/", "backoff": "0.2s"}],
    )
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")
    wait_for(lambda: events(config.db, "app") == ["first_seen"], what="event committed")
    wait_for(lambda: outbox(config.db) and outbox(config.db)[0][2] >= 1, what="a failed attempt")
    assert outbox(config.db)[0][1] == "pending" and "unreachable" in outbox(config.db)[0][3]
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    receiver = Receiver(port=port)
    try:
        restarted = start_daemon(config)
        restarted.notify.wait("READY=1")
        wait_for(lambda: receiver.events() == [("app", "first_seen")], what="delivered after restart")
        wait_for(lambda: outbox(config.db)[0][1] == "delivered", what="marked delivered")
        assert restarted.stop() == 0
    finally:
        receiver.close()


def test_command_sink_with_filters_via_once(config: ConfigFile, s3, bucket, tmp_path: Path):
    out = tmp_path / "events.jsonl"
    script = (
        "import json, os, sys; event = json.load(sys.stdin); "
        f"open({str(out)!r}, 'a').write(json.dumps({{'env': {{k: v for k, v in os.environ.items() "
        "if k.startswith('POLLER_') and k not in ('POLLER_CONFIG',)}, 'stdin': event}) + '\\n')"
    )
    for key in ("a", "b"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"v1")
    config.write(
        [{"name": "app-a", "bucket": bucket, "key": "a"}, {"name": "other", "bucket": bucket, "key": "b"}],
        notify=[
            {
                "name": "cmd",
                "type": "command",
                "command": [sys.executable, "-c", script],
                "watches": ["app-*"],
                "events": ["first_seen", "deleted"],
            }
        ],
    )
    assert run_cli("once", "--config", str(config.path)).returncode == 0
    s3.delete_object(Bucket=bucket, Key="a")
    s3.put_object(Bucket=bucket, Key="b", Body=b"v2")
    assert run_cli("once", "--config", str(config.path)).returncode == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(d["env"]["POLLER_WATCH"], d["env"]["POLLER_EVENT"]) for d in lines] == [
        ("app-a", "first_seen"),
        ("app-a", "deleted"),
    ]
    first = lines[0]
    assert first["env"]["POLLER_BUCKET"] == bucket and first["env"]["POLLER_KEY"] == "a"
    assert first["env"]["POLLER_ETAG"] == first["stdin"]["data"]["etag"] and first["env"]["POLLER_PREVIOUS_ETAG"] == ""
    assert lines[1]["env"]["POLLER_PREVIOUS_ETAG"] == first["stdin"]["data"]["etag"]
    assert first["env"]["POLLER_EVENT_ID"] == first["stdin"]["id"] != lines[1]["stdin"]["id"]
    assert first["env"]["POLLER_TYPE"] == first["stdin"]["type"] == "io.poller.object.first_seen"


def test_failed_command_gives_up_after_max_age_and_retry_requeues(config: ConfigFile, s3, bucket, tmp_path: Path):
    flag = tmp_path / "ok"
    script = f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 3)"
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    command_sink = {"name": "cmd", "type": "command", "command": [sys.executable, "-c", script]}
    config.write(
        [{"name": "app", "bucket": bucket, "key": "k"}],
        notify=[{**command_sink, "max_age": "1ms", "backoff": "1ms"}],
    )
    run_cli("once", "--config", str(config.path))
    assert outbox(config.db) == [("cmd", "pending", 1, "command exited 3")]
    run_cli("once", "--config", str(config.path))  # max_age is over: give up
    assert outbox(config.db)[0][1] == "failed"
    status = run_cli("status", "--config", str(config.path))
    assert "notifications: 0 pending, 1 failed" in status.stdout and "poller notify retry" in status.stdout
    listing = json.loads(
        run_cli("notify", "list", "--status", "failed", "--format", "json", "--config", str(config.path)).stdout
    )
    assert [(r["sink"], r["event"]) for r in listing] == [("cmd", "first_seen")]
    flag.touch()
    config.write(notify=[command_sink])
    retry = run_cli("notify", "retry", "--config", str(config.path))
    assert retry.returncode == 0 and "re-queued 1" in retry.stdout
    run_cli("once", "--config", str(config.path))
    assert outbox(config.db)[0][:2] == ("cmd", "delivered")


def test_a_failing_commands_stderr_keeps_the_sinks_secrets_out_of_the_row_and_the_log(
    config: ConfigFile, s3, bucket, tmp_path: Path
):
    """A hook that prints what it was given (a requests error quoting its Slack URL) must not put the
    token from its env into notifications.last_error, `notify list` or the log."""
    token = "T0KEN-abcdef1234567890"
    script = "import os, sys; print('404 Not Found for url: ' + os.environ['HOOK'], file=sys.stderr); sys.exit(1)"
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    hook = f"https://hooks.example.com/services/{token}"
    config.write(
        [{"name": "app", "bucket": bucket, "key": "k"}],
        notify=[{"name": "cmd", "type": "command", "command": [sys.executable, "-c", script]}],
    )
    config.path.write_text(config.path.read_text() + f'env = {{ HOOK = "{hook}" }}\n')  # scalars only in write()
    once = run_cli("once", "--config", str(config.path))
    assert once.returncode == 0, once.stderr
    row = outbox(config.db)[0]
    assert row[:3] == ("cmd", "pending", 1) and row[3].startswith("command exited 1: 404 Not Found for url: "), row
    listing = run_cli("notify", "list", "--format", "json", "--config", str(config.path)).stdout
    for text in (str(row), once.stdout, once.stderr, listing):
        assert token not in text


@pytest.mark.parametrize(
    ("entry", "fragments"),
    [
        ('type = "webhook"', ["notify #1", "url"]),
        ('type = "command"', ["notify #1", "command"]),
        ('type = "email"\nurl = "x"', ["notify #1", "type"]),
        ('type = "webhook"\nurl = "http://h/"\nevents = ["changed"]', ["notify #1", "changed"]),
        ('name = "hook"\ntype = "webhook"\nurl = "http://h/"\nformat = "xml"', ["notify #1 ('hook')", "'format'"]),
        (
            'name = "lake"\ntype = "webhook"\nurl = "http://h/"\nformat = "s3"\nevents = ["modified", "stale"]',
            ["notify #1 ('lake')", "field 'events'", "'stale' is a watch event", "format = 's3'"],
        ),
        (
            'name = "old"\ntype = "command"\ncommand = ["x"]\nformat = "legacy"\nevents = ["failing"]',
            ["notify #1 ('old')", "field 'events'", "'failing'", "format = 'legacy'"],
        ),
        (f'type = "webhook"\nurl = "http://h/"\nsecret = 12345{URL_TOKEN[:0]}\nbogus = 1', ["notify #1", "bogus"]),
        # Several sinks: each named (a default by position would hand queued events to another sink).
        (
            'name = "a"\ntype = "webhook"\nurl = "http://h/"\n[[notify]]\ntype = "webhook"\nurl = "http://i/"',
            ["notify #2 (webhook)", "field 'name'", "required when there are several", "such as webhook-2"],
        ),
    ],
)
def test_bad_notify_config_exit_2(tmp_path: Path, entry: str, fragments: list[str]):
    path = tmp_path / "c.toml"
    path.write_text(f"[[notify]]\n{entry}\n")
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)
    assert "12345" not in proc.stderr  # a secret of the wrong type is still not echoed


def test_prefix_watch_events_are_notified_per_key(config: ConfigFile, s3, bucket, receiver):
    for key in ("drops/a", "drops/b"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"v1")
    config.write(
        [{"name": "drops", "bucket": bucket, "prefix": "drops/"}],
        notify=[{"name": "hook", "type": "webhook", "url": receiver.url()}],
    )
    assert run_cli("once", "--config", str(config.path)).returncode == 0
    s3.delete_object(Bucket=bucket, Key="drops/b")
    assert run_cli("once", "--config", str(config.path)).returncode == 0
    got = sorted((data(body)["key"], data(body)["event"]) for _, body in receiver.received)
    assert got == [("drops/a", "first_seen"), ("drops/b", "deleted"), ("drops/b", "first_seen")]


# --- webhooks: no redirects, URLs validated at load, tokens never shown ---------------------------


class Recording(http.server.BaseHTTPRequestHandler):
    """Records every request it gets; answers with the class's ``answer`` (status, headers)."""

    requests: list[tuple[str, str, dict[str, str]]]
    answer: tuple[int, dict[str, str]] = (204, {})

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.requests.append((self.command, self.path, dict(self.headers)))
        status, headers = self.answer
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_HEAD = _record

    def log_message(self, *args: Any) -> None:
        pass


def recording(answer: tuple[int, dict[str, str]] = (204, {})) -> type[Recording]:
    return type("Handler", (Recording,), {"requests": [], "answer": answer})


def db_bytes(db: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for p in db.parent.glob(db.name + "*"))


def test_webhook_redirect_is_not_followed(config: ConfigFile, s3, bucket):
    from conftest import serving

    metadata = recording((200, {}))
    with serving(metadata) as meta_port:
        location = f"http://127.0.0.1:{meta_port}/latest/meta-data/iam/security-credentials/role?{URL_TOKEN}"
        hook = recording((302, {"Location": location}))
        with serving(hook) as hook_port:
            s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
            config.write(
                [{"name": "app", "bucket": bucket, "key": "k"}],
                notify=[{"name": "hook", "type": "webhook", "url": f"http://127.0.0.1:{hook_port}/hook"}],
            )
            once = run_cli("once", "--config", str(config.path), "--log-level", "DEBUG")
    assert once.returncode == 0 and "Traceback" not in once.stderr, once.stderr
    assert [(m, p) for m, p, _ in hook.requests] == [("POST", "/hook")]
    assert metadata.requests == [], "the redirect must not be followed"
    [(name, status, attempts, error)] = outbox(config.db)
    assert (name, status, attempts) == ("hook", "pending", 1)
    assert "HTTP 302" in error and f"127.0.0.1:{meta_port}" in error and "not followed" in error
    for text in (error, once.stderr, db_bytes(config.db)):
        assert "meta-data" not in text and URL_TOKEN not in text
    assert "HTTP 302" in once.stderr


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        (f"http://127.0.0.1:9/hook {URL_TOKEN}", "space or a control character"),
        (f"http://127.0.0.1:9/hook\t{URL_TOKEN}", "space or a control character"),
        (f"gopher://127.0.0.1/{URL_TOKEN}", "http:// or https://"),
        (f"http://127.0.0.1:99999/{URL_TOKEN}", "invalid port"),
        (f"http://[::1/{URL_TOKEN}", "IPv6"),
        (f"http://::1:8080/{URL_TOKEN}", "brackets"),
        (f"http:///{URL_TOKEN}", "no host"),
        (f"http://bad_host!/{URL_TOKEN}", "invalid host name"),
        (f"http://ex\u00e4mple.com/{URL_TOKEN}", "non-ASCII"),
    ],
)
def test_bad_webhook_url_is_refused_at_load(tmp_path: Path, url: str, fragment: str):
    path = tmp_path / "c.toml"
    escaped = url.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t")
    path.write_text(f'[[notify]]\nname = "hook"\ntype = "webhook"\nurl = "{escaped}"\n', encoding="utf-8")
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "notify #1 ('hook')" in message and "field 'url'" in message and fragment in message, message
    assert URL_TOKEN not in message


def test_ipv6_webhook_url_is_accepted():
    assert NotifySettings(type="webhook", url="http://[::1]:8080/hook").url == "http://[::1]:8080/hook"


def test_token_in_webhook_url_never_leaks(config: ConfigFile, s3, bucket):
    from conftest import serving

    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    failing = recording((500, {}))
    with serving(failing) as port:
        url = f"http://poller:{URL_TOKEN}-pw@127.0.0.1:{port}/hooks/{URL_TOKEN}-path?token={URL_TOKEN}-query"
        config.write(
            [{"name": "app", "bucket": bucket, "key": "k"}],
            notify=[{"name": "hook", "type": "webhook", "url": url, "backoff": "1ms"}],
        )
        first = run_cli("once", "--config", str(config.path), "--log-level", "DEBUG")
    # Now nothing listens there: the next attempt fails below HTTP.
    second = run_cli("once", "--config", str(config.path), "--log-level", "DEBUG")
    listing = run_cli("notify", "list", "--config", str(config.path))
    check = run_cli("check", "--config", str(config.path))
    [(method, path, headers)] = failing.requests
    assert (method, path) == ("POST", f"/hooks/{URL_TOKEN}-path?token={URL_TOKEN}-query")
    assert headers["Authorization"].startswith("Basic "), "userinfo is sent as Basic auth, not in the host"
    [(_, status, attempts, error)] = outbox(config.db)
    assert (status, attempts) == ("pending", 2) and "unreachable" in error
    assert "HTTP 500" in first.stderr and f"127.0.0.1:{port}/…" in first.stderr
    for text in (
        first.stdout + first.stderr,
        second.stdout + second.stderr,
        listing.stdout + listing.stderr,
        check.stdout + check.stderr,
        db_bytes(config.db),
    ):
        assert URL_TOKEN not in text, text[-2000:]
        assert "Traceback" not in text


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ({"url": f"http://127.0.0.1:9/x {URL_TOKEN}"}, "refused the webhook URL"),  # http.client's InvalidURL
        ({"url": f"http://127.0.0.1:9/{URL_TOKEN}", "timeout": "soon"}, "delivery failed: TypeError"),
    ],
)
def test_any_delivery_exception_is_a_failed_attempt_on_the_row(
    config: ConfigFile, s3, bucket, caplog, broken: dict[str, Any], expected: str
):
    """Whatever deliver() raises is recorded on the row (attempts + 1, last_error, token-free), never a
    database error, never a row left pending with no attempt."""
    from poller.notify import Dispatcher
    from poller.store import Store, open_engine

    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write(
        [{"name": "app", "bucket": bucket, "key": "k"}],
        notify=[{"name": "hook", "type": "webhook", "url": f"http://127.0.0.1:{free_port()}/x", "backoff": "1ms"}],
    )
    assert run_cli("once", "--config", str(config.path)).returncode == 0
    assert outbox(config.db)[0][1:3] == ("pending", 1)
    # A sink that slipped past validation (built without it): the standard library raises exceptions
    # other than URLError/OSError, and some quote the URL, token included.
    fields = dict(NotifySettings(type="webhook", url="http://h/", name="hook", backoff=0.001).__dict__)
    bad = NotifySettings.model_construct(**{**fields, **broken})
    store = Store(open_engine(config.url))
    dispatcher = Dispatcher(store, [bad], config.url)
    try:
        with caplog.at_level("WARNING"):
            assert dispatcher.run_once() == 1
    finally:
        dispatcher.stop()
        store.close()
    [(_, status, attempts, error)] = outbox(config.db)
    assert (status, attempts) == ("pending", 2)
    assert expected in error and URL_TOKEN not in error
    assert "dispatch failed" not in caplog.text and URL_TOKEN not in caplog.text
    assert "attempt 2 failed" in caplog.text


# --- command sinks: an allow-listed environment ---------------------------------------------------


def test_command_sink_gets_only_the_allow_listed_environment(config: ConfigFile, s3, bucket, tmp_path, start_daemon):
    from conftest import SECRET

    out = tmp_path / "env.json"
    script = f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    config.write(
        [{"name": "app", "bucket": bucket, "key": "k"}],
        notify=[{"name": "cmd", "type": "command", "command": [sys.executable, "-c", script]}],
    )
    # The sink's own env table, as an inline table (render_config writes scalars and lists only).
    config.path.write_text(config.path.read_text() + 'env = { DEPLOY_TARGET = "blue", LANG = "C.UTF-8" }\n')
    daemon_env = {
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": "poller-TEST-SESSION-TOKEN-5e55i0n",
        "POLLER_DATABASE__URL": config.url,
        "LC_TIME": "C",
        "TZ": "UTC",
    }
    daemon = start_daemon(config, env=daemon_env)
    daemon.notify.wait("READY=1")
    wait_for(lambda: out.exists() and out.stat().st_size, what="the command sink ran")
    assert daemon.stop() == 0
    env = json.loads(out.read_text())
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "NOTIFY_SOCKET"):
        assert name not in env, name
    assert not [k for k in env if k.startswith("POLLER_") and k not in {f"POLLER_{e.upper()}" for e in EVENT_ENV}]
    assert SECRET not in out.read_text()
    assert env["PATH"] == os.environ["PATH"] and env["TZ"] == "UTC" and env["LC_TIME"] == "C"
    assert env["POLLER_EVENT"] == "first_seen" and env["POLLER_WATCH"] == "app" and env["POLLER_KEY"] == "k"
    assert env["DEPLOY_TARGET"] == "blue" and env["LANG"] == "C.UTF-8", "the sink's env table is added"
    assert set(env) <= {"PATH", "HOME", "LANG", "TZ", "LC_TIME", "LC_ALL", "LC_CTYPE", "DEPLOY_TARGET"} | {
        f"POLLER_{e.upper()}" for e in EVENT_ENV
    } | {"PWD", "SHLVL", "_"}, sorted(env)


def test_command_env_is_a_pure_function_of_the_allow_list():
    settings = NotifySettings(type="command", command=["x"], env={"EXTRA": "1"})
    env = command_env(
        settings,
        {"event": "modified", "watch": "w", "key": "k", "seq": 2, "etag": None},
        {"PATH": "/bin", "AWS_SECRET_ACCESS_KEY": "s", "LC_ALL": "C", "POLLER_CONFIG": "/etc/p.toml", "HOME": "/h"},
    )
    assert env["PATH"] == "/bin" and env["HOME"] == "/h" and env["LC_ALL"] == "C" and env["EXTRA"] == "1"
    assert env["POLLER_EVENT"] == "modified" and env["POLLER_ETAG"] == "" and env["POLLER_KEY"] == "k"
    assert env["POLLER_TYPE"] == "io.poller.object.modified" and len(env["POLLER_EVENT_ID"]) == 32
    assert "AWS_SECRET_ACCESS_KEY" not in env and "POLLER_CONFIG" not in env


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ('type = "command"\ncommand = ["x"]\nenv = { "BAD NAME" = "1" }', "not a valid environment variable name"),
        ('type = "command"\ncommand = ["x"]\nenv = { POLLER_EVENT = "x" }', "POLLER_"),
        ('type = "webhook"\nurl = "http://h/"\nenv = { A = "1" }', "command sinks only"),
    ],
)
def test_bad_sink_env_exit_2(tmp_path: Path, entry: str, fragment: str):
    path = tmp_path / "c.toml"
    path.write_text(f"[[notify]]\n{entry}\n")
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 2 and "notify #1" in proc.stderr and "env" in proc.stderr and fragment in proc.stderr


def test_a_receiver_that_drips_its_answer_is_cut_off_at_the_sinks_timeout():
    """urllib's timeout bounds each read: a receiver sending its answer a byte at a time held the
    attempt, the dispatcher's pass (every sink's deliveries) and a stop for as long as it liked."""
    import socket
    import threading
    import time

    from poller.notify import DeliveryError, deliver

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 1000:
                if stop.wait(0.05):  # the adversary's pace: one byte every 50 ms, each read "in time"
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return  # the client gave up: what is tested

    server = threading.Thread(target=drip, daemon=True)
    server.start()
    row = {
        "event": "modified",
        "watch": "w",
        "bucket": "b",
        "key": "k",
        "etag": '"e"',
        "history_id": 1,
        "event_id": "x",
    }
    began = time.monotonic()
    try:
        with pytest.raises(DeliveryError, match="did not answer within its timeout"):
            deliver(sink(url=f"http://127.0.0.1:{listener.getsockname()[1]}/hook", timeout=1.0), row)
        assert time.monotonic() - began < 10  # the whole answer would take 51 s
    finally:
        stop.set()
        server.join(10)
        listener.close()


def test_without_secrets_takes_out_a_url_env_values_pieces_too():
    from poller.notify import without_secrets

    hook = "https://hooks.example.com/services/T0KEN-abcdef1234567890"
    command = NotifySettings(type="command", command=["x"], env={"HOOK": hook, "MODE": "1"}, name="c")
    said = without_secrets("POST /services/T0KEN-abcdef1234567890 failed (mode 1)", command)
    assert "T0KEN" not in said and "(mode 1)" in said
