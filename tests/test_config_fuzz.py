"""Property-based config input: every input is either a valid config or a one-paragraph ConfigError."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from conftest import ConfigFile, render_config, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poller.config import ConfigError, Settings, load_settings

KNOWN = {
    "s3": [
        "region",
        "endpoint_url",
        "addressing_style",
        "profile",
        "conditional",
        "connect_timeout",
        "read_timeout",
        "max_attempts",
    ],
    "database": ["url", "poll_retention"],
    "schedule": ["interval", "jitter", "concurrency"],
}
WATCH_KEYS = ["name", "bucket", "key", "interval", "cron"]

# Every class of character S3 allows in a key, up to and past its 1,024-byte limit.
s3_keys = st.one_of(
    st.text(min_size=0, max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=1100),
    st.sampled_from(["a b", "ü/日本", "+%20", "x" * 1024, "é" * 513, "\t", "\x7f", "q?u&e=r#y", "../..", "a\\b"]),
)
values = st.one_of(
    st.text(max_size=20),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.sampled_from(
        [
            "30s",
            "5m",
            "1h",
            "1d",
            "0s",
            "-1s",
            "1e9s",
            "999999999d",
            "1h30m",
            "250ms",
            "",
            "path",
            "both",
            "etag",
            "timestamp",
            "*/5 * * * *",
            "61 * * * *",
            "http://127.0.0.1:9000",
        ]
    ),
)
names = st.one_of(st.sampled_from(["a", "b", "", "dup"]), st.text(max_size=12))


@st.composite
def configs(draw: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for section, keys in KNOWN.items():
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from([*keys, "bogus"]), unique=True, max_size=4))
            data[section] = {k: draw(values) for k in chosen}
    watches = []
    for _ in range(draw(st.integers(0, 3))):
        watch: dict[str, Any] = {
            "bucket": draw(st.one_of(st.just("bucket"), st.text(max_size=8))),
            "key": draw(s3_keys),
        }
        for extra in draw(st.lists(st.sampled_from([*WATCH_KEYS, "unknown"]), unique=True, max_size=3)):
            watch[extra] = draw(names) if extra == "name" else draw(values)
        watches.append(watch)
    return {"sections": data, "watches": watches}


def check(path: Path) -> None:
    try:
        result = load_settings(path)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(str(path)), message
        assert "\n" not in message.strip() or "TOML syntax error" in message, message
        assert "Traceback" not in message
        assert any(w in message for w in ("field", "[", "watch #", "TOML", "UTF-8")), message
        return
    assert isinstance(result, Settings)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_generated_configs_are_valid_or_a_clear_error(cfg: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "poller.toml"
        path.write_text(render_config(cfg["sections"], cfg["watches"]), encoding="utf-8", errors="surrogatepass")
        check(path)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "poller.toml"
        path.write_bytes(blob)
        check(path)


def test_bad_environment_override_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "poller.toml"
    path.write_text("[schedule]\nconcurrency = 4\n")
    os.environ["POLLER_SCHEDULE__CONCURRENCY"] = "lots"
    try:
        try:
            load_settings(path)
        except ConfigError as exc:
            assert "concurrency" in str(exc) and "[schedule]" in str(exc)
        else:
            raise AssertionError("a non-integer concurrency must be refused")
    finally:
        del os.environ["POLLER_SCHEDULE__CONCURRENCY"]


bucket_names = st.one_of(
    st.text(max_size=70),
    st.sampled_from(["b", "my-bucket", "a.b", "UPPER_x", " ", "", "a/b", "a b", "x" * 256, "arn:aws:s3:::x", "ab\x00"]),
)
plain_watches = st.fixed_dictionaries(
    {"bucket": st.one_of(bucket_names, st.integers(), st.none())},
    optional={"name": st.one_of(st.text(max_size=12), st.integers()), "key": st.one_of(s3_keys, st.booleans())},
)


@settings(max_examples=400, deadline=None)
@given(item=plain_watches)
def test_the_fast_path_of_a_plain_watch_agrees_with_the_model(item: dict[str, Any]) -> None:
    """A million watches skip pydantic; each entry so accepted is the entry WatchSettings gives."""
    from pydantic import ValidationError

    from poller.config import WatchEntry, WatchSettings, _plain_entry

    fast = _plain_entry(item)
    try:
        slow: WatchEntry | None = WatchEntry.from_model(WatchSettings.model_validate(item))
    except ValidationError:
        slow = None
    if fast is not None:
        assert fast == slow
    elif all(type(v) is str for v in item.values()):
        # Declined by the fast path only when the model refuses it too (then the model explains).
        assert slow is None


def test_a_bad_watch_among_many_is_named_with_the_other_sections_errors() -> None:
    data: dict[str, Any] = {
        "schedule": {"interval": "soon"},
        "watch": [{"bucket": "b", "key": f"k{i}"} for i in range(5)]
        + [{"bucket": "b", "key": "x", "cron": "61 * * * *"}],
    }
    from poller.config import settings_from_mapping

    try:
        settings_from_mapping(data, "f.toml")
    except ConfigError as exc:
        message = str(exc)
    else:
        raise AssertionError("accepted")
    assert message.startswith("f.toml: [schedule] field 'interval'"), message
    assert "watch #6 ('b/x'): " in message and "cron" in message


# Pieces of a config file, in any order: the settings, watch tables, sink tables, and the traps of
# a line-based cut (a `[[watch]]` or `[database]` line inside a multi-line string, a header with
# spaces or a comment, an array continued over lines, CRLF line ends).
_PIECES = [
    '[database]\nurl = "sqlite:///from-the-file.db"\n',
    '[s3]\nregion = "eu-west-1"\n',
    '  [ schedule ]  # spaced\ninterval = "5m"\n',
    '[[notify]]\ntype = "webhook"\nurl = "https://hooks.example/x"\n',
    'note{i} = """\n[[watch]]\n[database]\nurl = "sqlite:///from-a-string.db"\n"""\n',
    "lit{i} = '''\n[[watch]]\n'''\n",
    '[[watch]]\nname = "w{i}"\nbucket = "b"\nkey = "k{i}"\n',
    '[[watch]]   # with a comment\nname = "w{i}"\nbucket = "b"\nkey = "k{i}"\ninclude = [\n  "a",\n  "b",\n]\n',
    '[[watch]]\r\nname = "w{i}"\r\nbucket = "b"\r\nkey = "k{i}"\r\n',
    '[[watch]]\nname = "w{i}"\nbucket = "b"\nkey = "k{i}"\ncomment = """\n[ database ]\n"""\n',
]


@given(st.lists(st.sampled_from(range(len(_PIECES))), max_size=8), st.booleans())
@settings(max_examples=400, deadline=None)
def test_the_settings_read_without_the_watch_list_are_the_files(order: list[int], crlf: bool) -> None:
    """Reading commands parse the text before the watch list when the rest is watch tables only:
    whenever that cut is taken, it yields what parsing the whole file yields, minus the watches."""
    import tomli

    from poller.config import _parse_without_watches

    text = "".join(_PIECES[p].format(i=n) for n, p in enumerate(order))
    if crlf:
        text = text.replace("\r\n", "\n").replace("\n", "\r\n")
    try:
        whole = tomli.loads(text)
    except tomli.TOMLDecodeError:
        return  # a table defined twice: the whole file's error is what every command reports
    whole.pop("watch", None)
    cut = _parse_without_watches(text)
    assert cut is None or cut == whole


def test_the_cut_is_taken_for_the_usual_layout_only() -> None:
    """Settings, then the list: parsed without it; anything but watch tables after it: the whole file."""
    from poller.config import without_watches

    head = '[database]\nurl = "sqlite:///p.db"\n'
    watch = '[[watch]]\nname = "w"\nbucket = "b"\nkey = "k"\n'
    assert without_watches(head + watch * 3) == head
    assert without_watches(head) is None  # no list: nothing to skip
    assert without_watches(head + watch + '[[notify]]\ntype = "webhook"\nurl = "https://x"\n' + watch) is None
    assert without_watches(watch + head) is None


def test_reading_commands_ignore_the_watch_list(config: ConfigFile, s3: Any, bucket: str) -> None:
    """`status` and `history` read the database, not the watches: a config whose list is broken
    (which `check` and the daemon refuse, naming the watch) still answers them, from the database
    named before the list or after it."""

    s3.put_object(Bucket=bucket, Key="k", Body=b"1")
    config.write([{"name": "ok", "bucket": bucket, "key": "k"}])
    assert run_cli("once", "--config", str(config.path)).returncode == 0
    good = config.path.read_text()
    config.path.write_text(good + '[[watch]]\nname = "bad"\nbucket = "b"\nkey = "k"\ninterval = "never"\n')
    check = run_cli("check", "--config", str(config.path))
    assert check.returncode == 2 and "'bad'" in check.stderr and "interval" in check.stderr
    for command in (["status"], ["history"], ["status", "--format", "json"]):
        proc = run_cli(*command, "--config", str(config.path))
        assert proc.returncode == 0, proc.stderr
    # The database section after the list: the whole file is parsed, the same database found.
    before, _, after = good.partition("[[watch]]")
    database = next(part for part in before.split("\n[") if part.startswith("database]"))
    moved = before.replace("\n[" + database, "\n") + "[[watch]]" + after + "[" + database
    config.path.write_text(moved)
    proc = run_cli("status", "--config", str(config.path), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert [row["name"] for row in json.loads(proc.stdout)] == ["ok"]
